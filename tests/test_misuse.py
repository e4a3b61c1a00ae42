"""Every misuse the "one house" issue lists gets a one-line answer: exit status 2, the problem
named, no traceback, and nothing lost or half-written.

Each test runs the real command line (`fromscratch.cli.main`) in this process, on tiny runs made
once per module, and checks the message, the exit status and that no work was done.
"""

import contextlib
import io
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import wait_for

from fromscratch import llama
from fromscratch.checkpoints.safe import save_safetensors
from fromscratch.cli import main
from fromscratch.engine import Trainer
from fromscratch.llama import Llama, LlamaConfig
from fromscratch.transformer import BPETokenizer, TransformerConfig, TranslationTask
from fromscratch.transformer.data import load_corpora
from fromscratch.transformer.training import paper_train_config


def cli(*argv, stdin: bytes | Path | None = None) -> tuple[int, str, str]:
    """`fromscratch ARGV` in this process: (exit status, stdout, stderr). stdin: bytes as from a
    pipe, or a file to read as `< FILE`."""
    out, err = io.StringIO(), io.StringIO()
    real_stdin = sys.stdin
    if stdin is not None:
        sys.stdin = open(stdin, encoding="utf-8") if isinstance(stdin, Path) else io.TextIOWrapper(io.BytesIO(stdin))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in argv])
    finally:
        if stdin is not None:
            sys.stdin.close()
        sys.stdin = real_stdin
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(result, *expected: str) -> None:
    code, _, err = result
    assert code == 2, err
    assert err.startswith("fromscratch: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err


# --- fixtures: a tiny text, a tiny Llama run, a tiny translation run ---------------------------


@pytest.fixture(scope="module")
def text(shared_data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "stories.txt"
    path.write_text((shared_data / "text" / "tinystories-cased-200kb.txt").read_text(encoding="utf-8")[:30_000],
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def llama_run(text, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llama") / "run"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        llama.train(str(text), str(out), preset="tiny", vocab_size=512, seq_len=32, batch_size=4, max_steps=2,
                    eval_every=2, save_every=2, device="cpu")
    return out


@pytest.fixture(scope="module")
def translate_run(tmp_path_factory) -> Path:
    """A tiny translation run whose model has a context of 24 positions."""
    out = tmp_path_factory.mktemp("translate") / "run"
    train, valid = load_corpora(["demo:train"]), load_corpora(["demo:test"])
    tokenizer = BPETokenizer.train(train.src + train.tgt, vocab_size=300)
    config = TransformerConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=24, dropout=0.0)
    task = TranslationTask(train, valid, tokenizer, config, batch_tokens=300, bleu_samples=0)
    engine = paper_train_config(out_dir=str(out), max_steps=2, eval_every=2, save_every=2, device="cpu",
                                noam_d_model=64)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        Trainer(task, engine, command=["test"]).fit()
    return out


def llama_train(text, out, *flags):
    return cli("llama", "train", "--data", text, "--out", out, "--preset", "tiny", "--vocab-size", "512",
               "--seq-len", "32", "--max-steps", "2", "--device", "cpu", *flags)


def translate_train(out, *flags):
    return cli("translate", "train", "--train", "demo:train", "--valid", "demo:test", "--out", out,
               "--preset", "tiny", "--vocab-size", "300", "--max-steps", "2", "--device", "cpu", *flags)


# --- --out ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["llama", "translate"])
def test_out_that_is_a_file_or_under_one_or_not_writable_fails_before_work(model, text, tmp_path):
    run = (lambda out: llama_train(text, out)) if model == "llama" else translate_train
    a_file = tmp_path / "a-file"
    a_file.write_text("precious\n")
    assert_one_line_error(run(a_file), f"--out {a_file}", "is a file")
    assert_one_line_error(run(a_file / "run"), "is a file, so no directory can be made under it")
    assert a_file.read_text() == "precious\n"
    if os.geteuid() == 0:  # root writes anywhere a permission allows nothing: use a filesystem that refuses
        assert_one_line_error(run(Path("/proc/fromscratch-run")), "cannot write in /proc")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert_one_line_error(run(locked / "run"), f"cannot write in {locked}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"] + ([] if os.geteuid() == 0 else ["locked"])


# --- training flags, before any tokenizing ---------------------------------------------------------


@pytest.mark.parametrize("flags, expected", [
    (["--lr", "0"], "--lr must be a positive number"),
    (["--lr=-1e-3"], "--lr must be a positive number"),
    (["--lr", "nan"], "--lr must be a positive number, got nan"),
    (["--weight-decay", "-0.1"], "--weight-decay must be a number ≥ 0"),
    (["--max-minutes", "0"], "--max-minutes must be a positive number"),
    (["--max-minutes", "-5"], "--max-minutes must be a positive number"),
    (["--warmup-steps", "-1"], "--warmup-steps must be ≥ 0"),
    (["--clip-grad", "-1"], "--clip-grad must be a number ≥ 0"),
    (["--clip-grad", "nan"], "--clip-grad must be a number ≥ 0"),
    (["--device", "tpu"], "--device tpu"),
])
@pytest.mark.parametrize("model", ["llama", "translate"])
def test_impossible_training_flags_fail_before_tokenizing(model, flags, expected, text, tmp_path):
    out = tmp_path / "run"
    result = llama_train(text, out, *flags) if model == "llama" else translate_train(out, *flags)
    assert_one_line_error(result, expected)
    assert not out.exists()  # no tokenizer trained, nothing written


@pytest.mark.parametrize("dropout", ["1.0", "-0.1", "1.5", "nan"])
def test_dropout_outside_0_1_fails_before_tokenizing(dropout, tmp_path):
    assert_one_line_error(translate_train(tmp_path / "run", "--dropout", dropout), "dropout must be")
    assert not (tmp_path / "run").exists()


# --- devices, sampling, NaN weights ---------------------------------------------------------------


def test_unknown_device_and_nan_temperature_are_refused(llama_run, translate_run):
    assert_one_line_error(cli("llama", "generate", "--checkpoint", llama_run, "--prompt", "Once", "--device", "tpu"),
                          "--device tpu")
    assert_one_line_error(cli("translate", "run", "--checkpoint", translate_run, "--device", "tpu", "Hello."),
                          "--device tpu")
    code, out, err = cli("llama", "generate", "--checkpoint", llama_run, "--prompt", "Once", "--temperature", "nan")
    assert_one_line_error((code, out, err), "temperature must be ≥ 0", "nan")
    assert out == ""


def test_nan_weights_reaching_sampling_are_named(llama_run, tmp_path):
    model = Llama.from_pretrained(llama_run)
    with torch.no_grad():
        model.layers[0].attention.wq.weight.fill_(float("nan"))
    model.save_pretrained(tmp_path / "broken", tokenizer_path=llama_run / "tokenizer.model")
    result = cli("llama", "generate", "--checkpoint", tmp_path / "broken", "--prompt", "Once", "--temperature", "0.8")
    assert_one_line_error(result, "NaN logits")


# --- malformed configs, indexes and weights ---------------------------------------------------------


def _hf_llama_dir(path: Path) -> Path:
    torch.manual_seed(0)
    Llama(LlamaConfig.from_preset("tiny", vocab_size=64, max_seq_len=32)).save_pretrained(path)
    return path


@pytest.mark.parametrize("value, shown", [("64", "'64' (str)"), ([64], "[64] (list)"), (64.5, "64.5 (float)")])
def test_config_json_with_a_wrong_type_names_the_key(value, shown, tmp_path):
    directory = _hf_llama_dir(tmp_path / "hf")
    config = json.loads((directory / "config.json").read_text())
    config["hidden_size"] = value
    (directory / "config.json").write_text(json.dumps(config))
    assert_one_line_error(cli("llama", "convert", "--checkpoint", directory, "--out", tmp_path / "out"),
                          "config.json", "hidden_size must be int", shown)
    assert not (tmp_path / "out").exists()


def test_our_model_config_with_a_wrong_type_names_the_field(translate_run, tmp_path):
    import shutil

    run = Path(shutil.copytree(translate_run, tmp_path / "run"))
    config = json.loads((run / "model_config.json").read_text())
    config["n_heads"] = "4"
    (run / "model_config.json").write_text(json.dumps(config))
    assert_one_line_error(cli("translate", "run", "--checkpoint", run, "Hello."), "n_heads must be int", "'4'")


@pytest.mark.parametrize("content", ["[]", '"latest"', "{not json"])
def test_a_checkpoint_index_that_is_not_an_object_is_refused(content, text, llama_run, tmp_path):
    import shutil

    run = Path(shutil.copytree(llama_run, tmp_path / "run"))
    (run / "checkpoints.json").write_text(content)
    assert_one_line_error(cli("llama", "generate", "--checkpoint", run, "--prompt", "Once"), "checkpoints.json")
    assert_one_line_error(llama_train(text, run, "--resume"), "checkpoints.json")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
@pytest.mark.parametrize("where", ["huggingface", "run"])
def test_integer_or_boolean_weights_are_refused_not_cast(dtype, where, llama_run, tmp_path):
    import shutil

    if where == "huggingface":
        directory = _hf_llama_dir(tmp_path / "hf")
        weights, name = directory / "model.safetensors", "model.norm.weight"
    else:
        directory = Path(shutil.copytree(llama_run, tmp_path / "run"))
        weights = next(directory.glob("checkpoints/step-*/model.safetensors"))
        name = "norm.weight"
    from safetensors.torch import load_file

    tensors = load_file(weights)
    tensors[name] = torch.ones_like(tensors[name], dtype=dtype)
    save_safetensors(tensors, weights, metadata={"format": "pt"} if where == "huggingface" else None)
    result = cli("llama", "convert", "--checkpoint", directory, "--out", tmp_path / "out")
    assert_one_line_error(result, str(weights), repr(name), str(dtype).removeprefix("torch."), "not floating point")


def test_translate_run_whose_config_disagrees_with_its_weights_names_tensor_and_shapes(translate_run, tmp_path):
    import shutil

    run = Path(shutil.copytree(translate_run, tmp_path / "run"))
    config = json.loads((run / "model_config.json").read_text())
    config["d_ff"] = 128  # the weights were trained with 256
    (run / "model_config.json").write_text(json.dumps(config))
    assert_one_line_error(cli("translate", "run", "--checkpoint", run, "Hello."),
                          "encoder_layers.0.feed_forward.w_1.weight", "(256, 64)", "(128, 64)")


# --- text that is not UTF-8, text longer than the context -------------------------------------------


def test_non_utf8_arguments_and_stdin_are_refused(llama_run, translate_run):
    not_utf8 = os.fsdecode(b"caf\xe9")  # how Python hands such an argument over: a surrogate escape
    assert_one_line_error(cli("llama", "generate", "--checkpoint", llama_run, "--prompt", not_utf8),
                          "--prompt is not UTF-8", "0xe9")
    assert_one_line_error(cli("translate", "run", "--checkpoint", translate_run, "fine", not_utf8),
                          "argument 2 is not UTF-8")
    code, out, err = cli("translate", "run", "--checkpoint", translate_run, stdin=b"Hello.\ncaf\xe9\n")
    assert_one_line_error((code, "", err.splitlines()[-1] + "\n"), "standard input, line 2: not UTF-8")
    assert len(out.splitlines()) == 1  # the first line was translated before the bad one was read


def test_a_file_on_standard_input_is_translated_in_batches_as_line_by_line(translate_run, tmp_path):
    """`translate run < FILE` decodes many lines at a time (here 2 sources in beam search's batch):
    the translations, in order, are those of the same lines from a pipe, one at a time; an empty
    line stays empty; a line longer than the context is named by its number; and a line that is not
    UTF-8 ends the run with a one-line error once the lines before it are printed."""
    long = " ".join(["I will read a book tomorrow.", "My mother is a teacher.", "The coffee is hot."] * 4)
    lines = ["Good morning.", "", "She is reading a book.", "I eat rice.", long, "Thank you."]
    text = "".join(line + "\n" for line in lines).encode()
    run = ("translate", "run", "--checkpoint", translate_run, "--beam", "2")
    code, one_at_a_time, err = cli(*run, stdin=text)
    assert code == 0 and "standard input, line 5: the input is" in err, err
    (tmp_path / "in.en").write_bytes(text)
    code, batched, err = cli(*run, "--batch-size", "2", stdin=tmp_path / "in.en")
    assert code == 0, err
    assert batched == one_at_a_time and len(batched.splitlines()) == 6 and batched.splitlines()[1] == ""
    assert "note: standard input, line 5 is" in err and "more than the model's context" in err, err
    (tmp_path / "bad.en").write_bytes(b"Good morning.\n\nI eat rice.\ncaf\xe9\nThank you.\n")
    code, out, err = cli(*run, stdin=tmp_path / "bad.en")
    assert_one_line_error((code, "", err.splitlines()[-1] + "\n"), "standard input, line 4: not UTF-8")
    assert out.splitlines() == [one_at_a_time.splitlines()[0], "", one_at_a_time.splitlines()[3]]
    assert_one_line_error(cli(*run, "--batch-size", "0", "Hi."), "batch size must be at least 1")


def test_translation_longer_than_the_context_is_translated_in_pieces_and_says_so(translate_run):
    sentences = ["I will read a book tomorrow.", "My mother is a teacher.", "The coffee is hot."] * 4
    code, out, err = cli("translate", "run", "--checkpoint", translate_run, "--beam", "1", " ".join(sentences))
    assert code == 0, err
    assert len(out.splitlines()) == 1 and out.strip()
    assert "note: the input is" in err and "more than the model's context of 23" in err and "pieces" in err


# --- runs of another model, empty data --------------------------------------------------------------


def test_resume_on_a_run_of_another_model_says_which_model_it_is(text, llama_run, translate_run):
    assert_one_line_error(llama_train(text, translate_run, "--resume"), "holds a transformer run")
    assert_one_line_error(translate_train(llama_run, "--resume"), "holds a llama run")
    assert_one_line_error(cli("translate", "run", "--checkpoint", llama_run, "Hello."), "holds a llama run")
    assert_one_line_error(cli("llama", "generate", "--checkpoint", translate_run, "--prompt", "x"),
                          "holds a transformer run")


@pytest.mark.parametrize("content", ["", "  \n\n\t\n"])
def test_empty_or_whitespace_training_data_says_the_file_is_empty(content, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text(content)
    assert_one_line_error(llama_train(empty, tmp_path / "run"), f"{empty} is empty")
    for suffix in (".en", ".id"):
        (tmp_path / f"corpus{suffix}").write_text(content)
    result = cli("translate", "train", "--train", tmp_path / "corpus", "--valid", "demo:test", "--out",
                 tmp_path / "run2", "--preset", "tiny", "--device", "cpu")
    assert_one_line_error(result, "corpus.en is empty")
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()


# --- signals, file modes ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_run_stopped_by_a_signal_saves_then_exits_128_plus_the_signal(signum, status, text, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "fromscratch", "llama", "train", "--data", str(text), "--out", str(out),
               "--preset", "tiny", "--vocab-size", "512", "--seq-len", "32", "--batch-size", "4",
               "--max-steps", "100000", "--save-every", "5", "--eval-every", "1000", "--device", "cpu"]
    with open(tmp_path / "log", "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(out / "checkpoints.json", process)
        time.sleep(0.3)
        process.send_signal(signum)
        code = process.wait(timeout=120)
    assert code == status, (tmp_path / "log").read_text()
    index = json.loads((out / "checkpoints.json").read_text())
    assert "checkpoint saved" in (tmp_path / "log").read_text()
    assert (out / "checkpoints" / index["latest"] / "model.safetensors").is_file()


def test_checkpoints_and_converted_files_are_readable_by_all(llama_run, tmp_path):
    old = os.umask(0o022)
    try:
        files = list(llama_run.glob("checkpoints/step-*/*")) + [llama_run / "model_config.json"]
        assert cli("llama", "convert", "--checkpoint", llama_run, "--out", tmp_path / "hf")[0] == 0
        files += list((tmp_path / "hf").iterdir())
        llama.export_llama2c(Llama.from_pretrained(llama_run), tmp_path / "model.bin")
        files.append(tmp_path / "model.bin")
    finally:
        os.umask(old)
    assert files
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert stat.S_IMODE((tmp_path / "hf").stat().st_mode) == 0o755


# --- what a command writes at its end, and decoding flags ------------------------------------------


def test_an_output_that_cannot_be_written_fails_before_decoding(translate_run, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("precious\n")
    for output, expected in ((a_file / "out.txt", "is a file, so no directory can be made under it"),
                             (tmp_path, "is a directory; give a file path")):
        code, out, err = cli("translate", "eval", "--checkpoint", translate_run, "--test", "demo:test", "--beam", "1",
                             "--output", output)
        assert_one_line_error((code, out, err), f"--output {output}", expected)
        assert "translated in" not in err  # refused before the decoding, not after it
    assert a_file.read_text() == "precious\n"


def test_eval_output_has_a_line_for_each_source_line_even_when_pairs_are_skipped(translate_run, tmp_path):
    test = tmp_path / "test"
    test.with_suffix(".en").write_text("I eat rice.\nWe read.\n\nShe runs.\n", encoding="utf-8")
    test.with_suffix(".id").write_text("Saya makan nasi.\nKami membaca.\nKosong.\nDia berlari.\n", encoding="utf-8")
    output = tmp_path / "made" / "out.txt"  # its folder is made
    code, _, err = cli("translate", "eval", "--checkpoint", translate_run, "--test", test, "--beam", "1",
                       "--output", output)
    assert code == 0, err
    lines = output.read_text(encoding="utf-8").split("\n")[:-1]
    assert len(lines) == 4 and lines[2] == "" and all(lines[i] for i in (0, 1, 3))
    _, alone, _ = cli("translate", "run", "--checkpoint", translate_run, "--beam", "1", "She runs.")
    assert lines[3] == alone.strip()  # the fourth line's translation is on the fourth line


@pytest.mark.parametrize("flags, expected", [
    (["--length-penalty", "nan"], "--length-penalty must be a number ≥ 0, got nan"),
    (["--length-penalty", "inf"], "--length-penalty must be a number ≥ 0, got inf"),
    (["--length-penalty=-1"], "--length-penalty must be a number ≥ 0, got -1.0"),
    (["--average", "0"], "--average must be at least 1, got 0"),
    (["--beam", "100000"], "a beam of 100000 is more than the model's vocabulary of"),
])
def test_impossible_decoding_flags_are_refused(flags, expected, translate_run):
    assert_one_line_error(cli("translate", "run", "--checkpoint", translate_run, *flags, "Hello."), expected)


def test_max_tokens_below_two_is_refused_before_tokenizing(tmp_path):
    for value in ("0", "1", "-5"):
        assert_one_line_error(translate_train(tmp_path / "run", "--max-tokens", value),
                              f"--max-tokens must be at least 2 (a token and the end token), got {value}")
    assert not (tmp_path / "run").exists()


def test_resume_with_another_vocab_size_or_label_smoothing_is_refused(tmp_path):
    run = tmp_path / "run"
    assert translate_train(run)[0] == 0
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert_one_line_error(translate_train(run, "--resume", "--vocab-size", "400"),
                          "vocab_size 300 → 400")
    assert_one_line_error(translate_train(run, "--resume", "--label-smoothing", "0.3"),
                          "label_smoothing 0.1 → 0.3")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    # More steps after the recipe's cooldown has run would train at a rate of 0: refused before any work.
    assert_one_line_error(translate_train(run, "--resume", "--max-steps", "3"),
                          "--max-steps 3: the run's cooldown began after step 1")
    assert translate_train(run, "--resume")[0] == 0  # the same flags resume (to the end it has reached)


def test_llama_convert_under_a_file_is_refused(llama_run, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("precious\n")
    assert_one_line_error(cli("llama", "convert", "--checkpoint", llama_run, "--out", a_file / "hf"),
                          f"{a_file} is a file, so no directory can be made under it")
    assert a_file.read_text() == "precious\n"


def test_a_tokenizer_smaller_than_a_runs_model_is_refused(llama_run, tmp_path):
    """A run's model is made for its own tokenizer: with a smaller one, the prompt's words would be
    unknown and every id past the tokenizer's would vanish from the text."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    small = tmp_path / "tokenizer.json"
    HFTokenizer(models.WordLevel({"<unk>": 0, "Once": 1, "upon": 2}, unk_token="<unk>")).save(str(small))
    assert_one_line_error(cli("llama", "generate", "--checkpoint", llama_run, "--tokenizer", small, "--prompt", "Once",
                              "--max-new-tokens", "2"), f"the tokenizer {small} has 3 tokens but the model 512")


def test_vocabulary_sizes_sentencepiece_refuses_are_said_in_terms_of_the_flag(tmp_path):
    text = tmp_path / "chars.txt"  # 150 distinct characters: more than 300 − 259 (specials and bytes)
    text.write_text(("".join(chr(0x4E00 + i) for i in range(150)) + "\n") * 20, encoding="utf-8")
    assert_one_line_error(cli("llama", "train", "--data", text, "--out", tmp_path / "a", "--preset", "tiny",
                              "--vocab-size", "300", "--max-steps", "1", "--device", "cpu"),
                          "--vocab-size 300 is too small: the text has")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("abc\n", encoding="utf-8")
    assert_one_line_error(cli("llama", "train", "--data", tiny, "--out", tmp_path / "b", "--preset", "tiny",
                              "--vocab-size", "2048", "--max-steps", "1", "--device", "cpu"),
                          "--vocab-size 2048: the text is too small for that many tokens; give at most")
    one_line = tmp_path / "one-line.txt"  # no line SentencePiece reads
    one_line.write_text("word " * 2000, encoding="utf-8")
    assert_one_line_error(cli("llama", "train", "--data", one_line, "--out", tmp_path / "c", "--preset", "tiny",
                              "--vocab-size", "300", "--max-steps", "1", "--device", "cpu"),
                          "it skips lines over 4,192 bytes; break the text into lines")


def test_a_directory_given_as_data_is_named_a_directory(tmp_path, llama_run):
    assert_one_line_error(llama_train(tmp_path, tmp_path / "run"), f"--data {tmp_path}: a directory; give a text file")
    assert_one_line_error(cli("moe", "inspect", "--checkpoint", llama_run, "--data", tmp_path, "--out",
                              tmp_path / "usage.png"), "a directory; give a text file")
