"""`fromscratch llama train|generate|convert` end to end, through the command line, on real text.

A tiny Llama trains on a slice of TinyShakespeare and must learn; a run killed with SIGKILL at a
random moment and resumed must end bit-for-bit where an uninterrupted run ends; bad arguments
must fail before any work; generation must stream what `Llama.generate` computes, from a run
directory and from a llama2.c file; conversion must give what transformers computes.
"""

import contextlib
import csv
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import kill_resume_and_compare_logs

from fromscratch.cli import main
from fromscratch.errors import UserError
from fromscratch.llama.checkpoints import export_llama2c
from fromscratch.llama.data import prepare_token_files, texts_from_dataset
from fromscratch.llama.model import Llama
from fromscratch.llama.tokenizer import Tokenizer

VOCAB = 512  # the pieces of `shakespeare_tokenizer` (conftest.py)
# A tiny model that learns in seconds on one CPU thread.
SMALL = ["--preset", "tiny", "--seq-len", "64", "--warmup-steps", "10", "--lr", "3e-3", "--device", "cpu"]


class Recorder(io.StringIO):
    """stdout that remembers how many separate writes it received (streaming shows as many)."""

    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, s):
        self.writes += bool(s)
        return super().write(s)


def cli(*argv) -> tuple[int, str, str, Recorder]:
    """Run `fromscratch ARGV` in this process: (exit status, stdout, stderr, stdout recorder)."""
    out, err = Recorder(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse: --help, or a malformed command line
            code = e.code
    return code, out.getvalue(), err.getvalue(), out


def generate(*argv) -> tuple[int, str, str, Recorder]:
    return cli("llama", "generate", "--device", "cpu", *argv)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def snapshot(directory: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in sorted(Path(directory).rglob("*"))}


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(shakespeare, tmp_path_factory) -> tuple[Path, str]:
    """`llama train` for 80 steps, tokenizer trained by the command itself: (run dir, stdout)."""
    run_dir = tmp_path_factory.mktemp("runs") / "shakespeare"
    code, out, err, _ = cli("llama", "train", "--data", shakespeare, "--out", run_dir, *SMALL,
                            "--vocab-size", VOCAB, "--batch-size", 16, "--max-steps", 80,
                            "--eval-every", 40, "--save-every", 40)
    assert code == 0, err
    return run_dir, out


@pytest.fixture(scope="module")
def llama2c_file(trained_run, tmp_path_factory) -> Path:
    """The trained model exported as a llama2.c .bin, alone in its folder (no tokenizer beside it)."""
    return export_llama2c(Llama.from_pretrained(trained_run[0]), tmp_path_factory.mktemp("llama2c") / "model.bin")


# --- 1. training learns and leaves a complete run directory ---------------------------------------


def test_train_learns_and_leaves_a_complete_run_directory(trained_run):
    run_dir, out = trained_run
    for name in ("checkpoints.json", "metrics.csv", "eval.csv", "run.json", "model_config.json",
                 "tokenizer.model", "loss.png", "task.json"):
        assert (run_dir / name).is_file(), name
    steps = read_csv(run_dir / "metrics.csv")
    evals = read_csv(run_dir / "eval.csv")
    assert [int(r["step"]) for r in steps] == list(range(1, 81))
    assert [int(r["step"]) for r in evals] == [40, 80]
    # An untrained model predicts about uniformly: loss ≈ log(vocab). Training must cut it far below.
    assert abs(float(steps[0]["loss"]) - math.log(VOCAB)) < 0.3
    val_loss = float(evals[-1]["val_loss"])
    assert val_loss < 0.7 * math.log(VOCAB), val_loss
    assert val_loss < float(evals[0]["val_loss"])
    assert "sample @ 40:" in out and "sample @ 80:" in out  # evaluate() prints a sample

    # from_pretrained(run dir) is the trained model: it reproduces the logged validation loss.
    model = Llama.from_pretrained(run_dir)
    assert model.config.vocab_size == VOCAB == Tokenizer(run_dir / "tokenizer.model").vocab_size
    meta = json.loads((run_dir / "data" / "meta.json").read_text())
    val = np.fromfile(run_dir / "data" / "val.bin", dtype=meta["dtype"]).astype(np.int64)
    rows = min(64, (len(val) - 1) // 64)
    windows = torch.from_numpy(np.stack([val[r * 64 : r * 64 + 65] for r in range(rows)]))
    with torch.no_grad():
        logits = model(windows[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    assert loss.item() == pytest.approx(val_loss, abs=1e-4)


def test_train_help_lists_the_flags():
    code, out, _, _ = cli("llama", "train", "--help")
    assert code == 0
    for flag in ("--data", "--out", "--preset", "--max-steps", "--batch-size", "--seed", "--resume",
                 "--tokenizer", "--seq-len", "--grad-accum", "--vocab-size"):
        assert flag in out, flag


# --- 2. kill -9 at a random moment, then --resume: bit-for-bit the uninterrupted run --------------


@pytest.mark.slow  # ~18 s: three processes start, two of them side by side
def test_kill_9_then_resume_is_bit_identical_to_an_uninterrupted_run(shakespeare, shakespeare_tokenizer, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    def command(out: Path, *extra) -> list[str]:
        return [sys.executable, "-m", "fromscratch", "llama", "train", "--data", str(shakespeare),
                "--tokenizer", str(shakespeare_tokenizer), "--out", str(out), *SMALL, "--batch-size", "8",
                "--max-steps", "60", "--save-every", "10", "--eval-every", "30", "--seed", "5", *extra]

    # The uninterrupted run goes on beside the one that is killed (two cores, half the wall time).
    kill_resume_and_compare_logs(command, straight, killed, max_steps=60, steps=(11, 55))
    a, b = Llama.from_pretrained(straight).state_dict(), Llama.from_pretrained(killed).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


# --- 3. bad arguments fail at once, with status 2 and one line, having done nothing ----------------


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--preset", "enormous"], "unknown Llama preset 'enormous'"),
        (["--data", "no/such/file.txt"], "no/such/file.txt: no such file"),
        (["--resume"], "holds no checkpoint to resume from"),
        (["--batch-size", "6", "--grad-accum", "4"], "not divisible"),
        (["--tokenizer", "no/such.model"], "no such file"),
        (["--seq-len", "-3"], "--seq-len must be at least 1"),
    ],
    ids=["unknown-preset", "missing-data", "resume-nothing", "batch-split", "missing-tokenizer", "seq-len"],
)
def test_bad_arguments_fail_before_any_work(shakespeare, tmp_path, flags, expected):
    out = tmp_path / "new-run"
    data = [] if "--data" in flags else ["--data", shakespeare]
    code, stdout, stderr, _ = cli("llama", "train", *data, "--out", out, "--max-steps", 5, *flags)
    assert code == 2
    assert stderr.startswith("fromscratch: error:") and stderr.count("\n") == 1 and expected in stderr, stderr
    assert stdout == ""
    assert not out.exists()


@pytest.mark.parametrize(
    "flags, expected",
    [
        ([], "already holds a run"),
        (["--resume", "--preset", "small"], "was started with --preset tiny (asked now: small)"),
        (["--resume", "--seq-len", "32"], "--seq-len 64 (asked now: 32)"),
        (["--resume", "--batch-size", "32"], "batch_size=16 (asked now: 32)"),
        (["--resume", "--tokenizer", "LLAMA2"], "is not the tokenizer the run"),
    ],
    ids=["new-run-over-a-run", "resume-other-preset", "resume-other-seq-len", "resume-other-batch",
         "resume-other-tokenizer"],
)
def test_bad_arguments_leave_an_existing_run_untouched(trained_run, shakespeare, shared_data, flags, expected):
    run_dir = trained_run[0]
    flags = [shared_data / "tokenizers" / "llama2-tokenizer.model" if f == "LLAMA2" else f for f in flags]
    before = snapshot(run_dir)
    argv = ["llama", "train", "--data", shakespeare, "--out", run_dir, "--seq-len", 64, "--batch-size", 16]
    code, stdout, stderr, _ = cli(*argv, "--max-steps", 100, *flags)
    assert code == 2
    assert stderr.startswith("fromscratch: error:") and stderr.count("\n") == 1 and expected in stderr, stderr
    assert stdout == ""
    assert snapshot(run_dir) == before


# --- 4. generate: streams what Llama.generate computes, from any checkpoint -----------------------


def expected_greedy(model: Llama, tokenizer: Tokenizer, prompt: str, n: int, **options) -> tuple[str, int]:
    """What the CLI should print for a greedy run: Llama.generate's ids, decoded, cut at the first
    BOS (in text tokenized as `llama train` does, BOS starts the next, unrelated paragraph)."""
    ids = tokenizer.encode(prompt, bos=True)
    new = model.generate(ids, max_new_tokens=n, temperature=0, eos_id=tokenizer.eos_id, **options)[len(ids):]
    if tokenizer.bos_id in new:
        new = new[: new.index(tokenizer.bos_id)]
    return tokenizer.decode(ids + new) + "\n", len(new)


def test_generate_from_a_run_directory_streams_the_greedy_continuation(trained_run):
    run_dir = trained_run[0]
    code, out, err, stdout = generate("--checkpoint", run_dir, "--prompt", "ROMEO:",
                                 "--temperature", 0, "--max-new-tokens", 40)
    assert code == 0, err
    model, tokenizer = Llama.from_pretrained(run_dir), Tokenizer(run_dir / "tokenizer.model")
    expected, n_new = expected_greedy(model, tokenizer, "ROMEO:", 40)
    assert n_new >= 5 and out == expected and out.startswith("ROMEO:")
    assert stdout.writes >= n_new // 2  # printed as it was produced, not all at the end


def test_generate_from_a_llama2c_file_with_its_tokenizer(trained_run, llama2c_file):
    run_dir = trained_run[0]
    options = ["--prompt", "ROMEO:", "--temperature", 0, "--max-new-tokens", 40]
    code, _, err, _ = generate("--checkpoint", llama2c_file, *options)  # nothing beside it names a tokenizer
    assert code == 2 and "pass --tokenizer" in err
    code, out, err, _ = generate("--checkpoint", llama2c_file, "--tokenizer", run_dir / "tokenizer.model", *options)
    assert code == 0, err
    tokenizer = Tokenizer(run_dir / "tokenizer.model")
    assert out == expected_greedy(Llama.from_pretrained(llama2c_file), tokenizer, "ROMEO:", 40)[0]
    assert out == generate("--checkpoint", run_dir, *options)[1]  # the same weights, the same text


def test_generate_no_repeat_ngram_bans_repeated_ngrams_and_refuses_a_negative_size(trained_run):
    run_dir = trained_run[0]
    options = ["--checkpoint", run_dir, "--prompt", "ROMEO:", "--temperature", 0, "--max-new-tokens", 40]
    code, out, err, _ = generate(*options, "--no-repeat-ngram", 2)
    assert code == 0, err
    model, tokenizer = Llama.from_pretrained(run_dir), Tokenizer(run_dir / "tokenizer.model")
    assert out == expected_greedy(model, tokenizer, "ROMEO:", 40, no_repeat_ngram_size=2)[0]
    assert out != expected_greedy(model, tokenizer, "ROMEO:", 40)[0]  # the ban changed the text
    code, _, err, _ = generate(*options, "--no-repeat-ngram", -1)
    assert code == 2 and "--no-repeat-ngram must be 0 (off) or more, got -1" in err


def test_generate_seed_makes_sampling_reproducible(trained_run):
    def sample(seed):
        code, out, err, _ = generate("--checkpoint", trained_run[0], "--prompt", "KING",
                                "--temperature", 1.0, "--top-k", 40, "--top-p", 0.95,
                                "--max-new-tokens", 40, "--seed", seed)
        assert code == 0, err
        return out

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_generate_refuses_a_prompt_longer_than_the_context(trained_run, shakespeare):
    prompt = shakespeare.read_text()[:5000]  # ~2500 tokens; the context is 256
    code, out, err, _ = generate("--checkpoint", trained_run[0], "--prompt", prompt)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "context of 256 tokens" in err and "shorten it" in err, err


@pytest.mark.parametrize("flags, expected", [(["--temperature", -1], "temperature must be ≥ 0"),
                                             (["--top-p", 1.5], "top_p must be in (0, 1]"),
                                             (["--checkpoint", "no/such/run"], "no such file or directory")])
def test_generate_refuses_bad_options_before_printing_anything(trained_run, flags, expected):
    code, out, err, _ = generate("--checkpoint", trained_run[0], "--prompt", "ROMEO:", *flags)
    assert code == 2 and out == "" and err.count("\n") == 1 and expected in err, err


def test_generate_stops_where_the_context_ends(trained_run):
    code, out, err, _ = generate("--checkpoint", trained_run[0], "--prompt", "ROMEO:",
                            "--max-new-tokens", 10_000, "--seed", 0)
    assert code == 0 and "generating at most" in err and out.startswith("ROMEO:")


# --- 5. convert: a Hugging Face directory that transformers runs with the same logits -------------


@pytest.mark.parametrize("source", ["run-dir", "llama2c"])
def test_convert_writes_a_directory_transformers_loads_with_equal_logits(trained_run, llama2c_file, tmp_path, source):
    import transformers

    run_dir = trained_run[0]
    checkpoint = run_dir if source == "run-dir" else llama2c_file
    code, out, err, _ = cli("llama", "convert", "--checkpoint", checkpoint, "--out", tmp_path / "hf",
                            "--tokenizer", run_dir / "tokenizer.model")
    assert code == 0, err
    assert (tmp_path / "hf" / "tokenizer.model").is_file() and "wrote a Hugging Face checkpoint" in out
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = Llama.from_pretrained(checkpoint)
    ids = torch.tensor([Tokenizer(run_dir / "tokenizer.model").encode("ROMEO:\nWhat light through yonder window")])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-4, rtol=0)


def test_convert_finds_the_tokenizer_of_a_run_directory(trained_run, tmp_path):
    code, _, err, _ = cli("llama", "convert", "--checkpoint", trained_run[0], "--out", tmp_path / "hf")
    assert code == 0, err
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == (trained_run[0] / "tokenizer.model").read_bytes()


# --- 6. data: hub datasets, token files, bad text -----------------------------------------------


def test_texts_from_dataset_reads_a_column_and_names_a_missing_one():
    import datasets

    dataset = datasets.Dataset.from_dict({"text": ["Once upon a time.", "  ", "", "The end.\n"], "id": [1, 2, 3, 4]})
    assert list(texts_from_dataset(dataset)) == ["Once upon a time.", "The end."]
    with pytest.raises(UserError, match="no column 'story'.*columns: text, id"):
        list(texts_from_dataset(dataset, "story"))


def test_train_on_a_hub_dataset(shared_data, tmp_path, monkeypatch):
    """`--data hf:NAME:SPLIT:FIELD` end to end, the hub replaced by a local Dataset: the tokenizer
    is trained on the dataset's text and the run loads."""
    import datasets

    stories = (shared_data / "text" / "tinystories-cased-200kb.txt").read_text(encoding="utf-8").split("\n\n")
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_dict({"story": stories[:300]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    code, out, err, _ = cli("llama", "train", "--data", "hf:roneneldan/TinyStories:validation:story",
                            "--out", tmp_path / "run", *SMALL, "--vocab-size", 400, "--batch-size", 4,
                            "--max-steps", 3)
    assert code == 0, err
    assert calls and set(calls) == {("roneneldan/TinyStories", "validation")}
    assert Llama.from_pretrained(tmp_path / "run").config.vocab_size == 400
    code, _, err, _ = cli("llama", "train", "--data", "hf:roneneldan/TinyStories:train:text", "--out",
                          tmp_path / "other", "--tokenizer", tmp_path / "run" / "tokenizer.model", "--max-steps", 1)
    assert code == 2 and "no column 'text'" in err


def test_token_files_are_written_once_and_memory_mapped(shakespeare, shakespeare_tokenizer, tmp_path):
    tokenizer = Tokenizer(shakespeare_tokenizer)
    train, val = prepare_token_files([str(shakespeare)], tokenizer, shakespeare_tokenizer, tmp_path / "data")
    assert isinstance(train, np.memmap) and train.dtype == np.uint16  # 512 pieces fit in 16 bits
    assert len(val) > 0 and len(train) > 10 * len(val)
    paragraphs = [p.strip("\n") for p in shakespeare.read_text().split("\n\n") if p.strip()]
    stream = [i for p in paragraphs for i in tokenizer.encode(p, bos=True)]
    assert np.array_equal(np.concatenate([train, val]), stream)  # BOS + paragraph, in file order
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "data").iterdir()}
    train2, val2 = prepare_token_files([str(shakespeare)], tokenizer, shakespeare_tokenizer, tmp_path / "data")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "data").iterdir()} == mtimes  # reused
    assert np.array_equal(train, train2) and np.array_equal(val, val2)


def test_text_that_is_not_utf8_or_empty_is_named(shakespeare_tokenizer, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Caf\u00e9 cr\u00e8me\n\nna\u00efve".encode("latin-1"))
    tokenizer = Tokenizer(shakespeare_tokenizer)
    with pytest.raises(UserError, match=r"latin1\.txt: not UTF-8 text \(byte 3"):
        prepare_token_files([str(latin1)], tokenizer, shakespeare_tokenizer, tmp_path / "data")
    code, _, err, _ = cli("llama", "train", "--data", latin1, "--out", tmp_path / "run",
                          "--tokenizer", shakespeare_tokenizer)
    assert code == 2 and "latin1.txt: not UTF-8 text" in err and not (tmp_path / "run").exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n\n")
    with pytest.raises(UserError, match="empty.txt: holds no text"):
        prepare_token_files([str(empty)], tokenizer, shakespeare_tokenizer, tmp_path / "data")
