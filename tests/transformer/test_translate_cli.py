"""`fromscratch translate train | eval | run`, end to end in subprocesses on tiny data."""

import json
import os
import re
import subprocess
import sys
import threading

import pytest

from fromscratch import demo_corpus
from fromscratch.transformer.data import load_corpora

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def fromscratch(*args, stdin=None, check=True):
    result = subprocess.run([sys.executable, "-m", "fromscratch", *map(str, args)], input=stdin, env=ENV,
                            capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def write(prefix, corpus, indices, extra=()):
    src = [corpus.src[i] for i in indices] + [e for e, _ in extra]
    tgt = [corpus.tgt[i] for i in indices] + [i for _, i in extra]
    prefix.with_suffix(".en").write_text("".join(s + "\n" for s in src), encoding="utf-8")
    prefix.with_suffix(".id").write_text("".join(t + "\n" for t in tgt), encoding="utf-8")
    return prefix


TRAIN_FLAGS = ["--preset", "tiny", "--vocab-size", "300", "--batch-tokens", "400", "--warmup-steps", "5",
               "--eval-every", "10", "--save-every", "10", "--bleu-samples", "4", "--device", "cpu",
               "--cooldown", "0"]  # no cooldown, so that a finished run can be resumed for more steps


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    train, test = load_corpora(["demo:train"]), load_corpora(["demo:test"])
    return {
        "train": write(d / "train", train, range(300), extra=[("", "Kosong.")]),  # one empty source line
        "valid": write(d / "valid", test, range(20)),
        "test": write(d / "test", test, range(20, 50)),
        "dir": d,
    }


@pytest.fixture(scope="module")
def run_dir(data):
    out = data["dir"] / "run"
    result = fromscratch("translate", "train", "--train", data["train"], "--valid", data["valid"], "--out", out,
                         "--max-steps", "20", *TRAIN_FLAGS)
    assert "skipped 1 pair: 1 empty (train.en:301)" in result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["step"] == 20 and {"val_loss", "val_bleu", "val_chrf"} <= set(summary)
    return out


@pytest.mark.slow
def test_train_writes_a_complete_run(run_dir):
    for name in ("tokenizer.json", "model_config.json", "checkpoints.json", "metrics.csv", "run.json",
                 "translate_data.json"):
        assert (run_dir / name).exists(), name
    index = json.loads((run_dir / "checkpoints.json").read_text())
    assert index["latest"] == "step-00000020"
    assert json.loads((run_dir / "model_config.json").read_text())["d_model"] == 64  # the tiny preset
    record = json.loads((run_dir / "run.json").read_text())
    assert record["train_config"]["schedule"] == "noam" and record["train_config"]["betas"] == [0.9, 0.98]
    assert record["train_config"]["eps"] == 1e-9 and record["train_config"]["noam_d_model"] == 64


@pytest.mark.slow
def test_eval_last_line_is_bleu_and_chrf(run_dir, data, tmp_path):
    out_file = tmp_path / "hyp.txt"
    result = fromscratch("translate", "eval", "--checkpoint", run_dir, "--test", data["test"], "--beam", "2",
                         "--output", out_file, "--device", "cpu")
    assert re.fullmatch(r"BLEU \d+\.\d\d chrF \d+\.\d\d", result.stdout.splitlines()[-1])
    assert len(out_file.read_text(encoding="utf-8").splitlines()) == 30
    assert re.search(r"^translated in \d+\.\d s \(\d+\.\d sentences/s\)$", result.stderr, re.M), result.stderr
    # 7 sentences at a time: beam search keeps 7 in its batch, the next taking each finished one's place.
    # (Each sentence then stops at its own length + 50 rather than its batch's longest + 50; the
    # translations themselves are tested in test_transformer_fast.py.)
    pooled = fromscratch("translate", "eval", "--checkpoint", run_dir, "--test", data["test"], "--beam", "2",
                         "--batch-size", "7", "--output", out_file)
    assert re.fullmatch(r"BLEU \d+\.\d\d chrF \d+\.\d\d", pooled.stdout.splitlines()[-1])
    assert len(out_file.read_text(encoding="utf-8").splitlines()) == 30
    bad = fromscratch("translate", "eval", "--checkpoint", run_dir, "--test", data["test"], "--batch-size", "0",
                      check=False)
    assert bad.returncode == 2 and "batch size must be at least 1 sentence, got 0" in bad.stderr
    assert "Traceback" not in bad.stderr
    # A single checkpoint directory works too.
    single = run_dir / "checkpoints" / "step-00000010"
    result = fromscratch("translate", "eval", "--checkpoint", single, "--test", data["test"], "--beam", "1")
    assert re.fullmatch(r"BLEU \d+\.\d\d chrF \d+\.\d\d", result.stdout.splitlines()[-1])
    # Decoding options: no bigram twice in any translation, and a length penalty.
    result = fromscratch("translate", "eval", "--checkpoint", run_dir, "--test", data["test"], "--beam", "2",
                         "--no-repeat-ngram", "2", "--length-penalty", "1.0", "--output", out_file)
    for line in out_file.read_text(encoding="utf-8").splitlines():
        words = line.split()
        assert len(set(zip(words, words[1:]))) == len(words) - 1 or not words, line
    bad = fromscratch("translate", "run", "--checkpoint", run_dir, "--no-repeat-ngram", "-1", "Hi.", check=False)
    assert bad.returncode == 2 and "--no-repeat-ngram must be 0" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_run_translates_arguments(run_dir):
    result = fromscratch("translate", "run", "--checkpoint", run_dir, "--beam", "2", "I eat rice.", "Thank you.")
    assert len(result.stdout.splitlines()) == 2


@pytest.mark.slow
def test_beam_search_takes_the_length_penalty_the_run_records(run_dir, data, tmp_path):
    """`translate train` records its recipe's α (decoding.json); `translate eval` and `run` take it
    when no --length-penalty is given, a given one wins, what is not a run gets §6.1's 0.6, and a
    damaged record is a one-line error that names it, before any work."""
    import argparse
    import shutil

    from fromscratch.errors import UserError
    from fromscratch.transformer.cli import _decoding
    from fromscratch.transformer.training import RECIPES
    from fromscratch.transformer.translation import run_length_penalty

    recorded = RECIPES["cpu"]["decoding"]["length_penalty"]  # the run trained on the CPU recipe
    assert json.loads((run_dir / "decoding.json").read_text()) == {"length_penalty": recorded}

    def alpha(checkpoint, given=None):
        args = argparse.Namespace(beam=4, no_repeat_ngram=0, length_penalty=given, checkpoint=str(checkpoint))
        return _decoding(args)["length_penalty"]

    assert alpha(run_dir) == recorded != 0.6
    assert alpha(run_dir / "checkpoints" / "step-00000010") == recorded  # one checkpoint of the run
    assert alpha(run_dir, given=0.6) == 0.6
    assert alpha(tmp_path) == alpha("Helsinki-NLP/opus-mt-en-id") == 0.6  # a directory that is no run, a hub name
    copy = shutil.copytree(run_dir, tmp_path / "copy")
    (copy / "decoding.json").unlink()  # a run from before the record
    assert run_length_penalty(copy) == 0.6
    (copy / "decoding.json").write_text('{"length_penalty": "long"}')
    with pytest.raises(UserError, match="decoding.json: length_penalty should be a number ≥ 0, not 'long'"):
        run_length_penalty(copy)
    result = fromscratch("translate", "eval", "--checkpoint", copy, "--test", data["test"], check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "decoding.json" in result.stderr


@pytest.mark.slow
def test_run_streams_stdin_line_by_line(run_dir):
    """Each translation arrives before the next line is even written: output is flushed per line."""
    proc = subprocess.Popen([sys.executable, "-m", "fromscratch", "translate", "run", "--checkpoint", str(run_dir),
                             "--beam", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    timer = threading.Timer(120, proc.kill)
    timer.start()
    try:
        answers = []
        for line in ["Good morning.", "", "She is reading a book."]:
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
            answers.append(proc.stdout.readline())
            assert answers[-1].endswith("\n"), proc.stderr.read()
        assert answers[1] == "\n"  # an empty line stays empty
        proc.stdin.close()
        assert proc.wait() == 0
    finally:
        timer.cancel()
        proc.kill()


@pytest.mark.slow
def test_resume_continues_and_refuses_other_data(run_dir, data):
    changed = fromscratch("translate", "train", "--train", data["train"], "--valid", data["valid"], "--out",
                          run_dir, "--max-steps", "25", "--resume", *TRAIN_FLAGS[:5], "500", *TRAIN_FLAGS[6:],
                          check=False)
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert "batch_tokens 400 → 500" in changed.stderr
    result = fromscratch("translate", "train", "--train", data["train"], "--valid", data["valid"], "--out", run_dir,
                         "--max-steps", "25", "--resume", *TRAIN_FLAGS)
    assert json.loads(result.stdout.strip().splitlines()[-1])["step"] == 25
    again = fromscratch("translate", "train", "--train", data["train"], "--valid", data["valid"], "--out", run_dir,
                        "--max-steps", "25", *TRAIN_FLAGS, check=False)
    assert again.returncode == 2 and "--resume" in again.stderr


@pytest.mark.slow
def test_user_errors_are_one_line_without_traceback(data, tmp_path):
    (tmp_path / "bad.en").write_text("a\nb\nc\n")
    (tmp_path / "bad.id").write_text("x\ny\n")
    result = fromscratch("translate", "train", "--train", tmp_path / "bad", "--valid", data["valid"], "--out",
                         tmp_path / "run", *TRAIN_FLAGS, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert re.search(r"bad\.en has 3 lines but .*bad\.id has 2", result.stderr)
    result = fromscratch("translate", "eval", "--checkpoint", tmp_path / "nowhere", "--test", data["test"],
                         check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "nowhere" in result.stderr


def test_parser_wiring_and_the_recipes_of_each_device():
    """Unset flags take the device's recipe: the one-hour CPU recipe, or the paper's base on a GPU."""
    from fromscratch.cli import build_parser
    from fromscratch.transformer.cli import cmd_eval, cmd_run, cmd_train
    from fromscratch.transformer.training import RECIPES, paper_train_config, recipe

    parser = build_parser()
    args = parser.parse_args(["translate", "train", "--train", "a", "b", "--valid", "c", "--out", "o"])
    assert args.func is cmd_train and args.train == ["a", "b"]
    assert (args.preset, args.batch_tokens, args.lr, args.warmup_steps) == (None, None, None, None)
    assert (args.max_steps, args.clip_grad) == (100_000, 1.0)
    assert (args.d_model, args.n_heads, args.n_encoder_layers, args.n_decoder_layers, args.d_ff) == (None,) * 5
    assert args.cooldown is None and RECIPES["cpu"]["engine"]["cooldown"] == 0.2  # the last fifth, on the clock
    assert args.weight_decay is None and RECIPES["cpu"]["engine"]["weight_decay"] == 0.2  # AdamW's, on matrices
    assert "weight_decay" not in RECIPES["gpu"]["engine"] and paper_train_config().weight_decay == 0.0  # §5.3's Adam
    args = parser.parse_args(["translate", "train", "--train", "a", "--valid", "c", "--out", "o",
                              "--d-model", "192", "--n-decoder-layers", "2", "--d-ff", "768"])
    assert (args.d_model, args.n_heads, args.n_decoder_layers, args.d_ff) == (192, None, 2, 768)
    assert args.activation is None and parser.parse_args(
        ["translate", "train", "--train", "a", "--valid", "c", "--out", "o", "--activation", "gelu"]).activation == "gelu"
    assert args.label_smoothing == 0.1 and parser.parse_args(  # §5.4
        ["translate", "train", "--train", "a", "--valid", "c", "--out", "o", "--label-smoothing", "0"]).label_smoothing == 0
    assert args.bpe_dropout == 0.0 and parser.parse_args(
        ["translate", "train", "--train", "a", "--valid", "c", "--out", "o", "--bpe-dropout", "0.1"]).bpe_dropout == 0.1
    assert recipe("cpu") is RECIPES["cpu"] and RECIPES["cpu"]["model"]["preset"] == "slim"
    gpu = RECIPES["gpu"]
    assert gpu["model"]["preset"] == "base" and gpu["model"]["batch_tokens"] == 25_000  # Table 3, §5.1
    assert gpu["engine"] == {"dtype": "bfloat16", "compile": True}
    assert gpu["decoding"] == {"length_penalty": 0.6} and RECIPES["cpu"]["decoding"] == {"length_penalty": 1.2}
    paper = paper_train_config()
    assert (paper.lr, paper.warmup_steps, paper.betas, paper.eps) == (1.0, 4000, (0.9, 0.98), 1e-9)  # §5.3
    args = parser.parse_args(["translate", "eval", "--checkpoint", "r", "--test", "t"])
    assert args.func is cmd_eval and args.beam == 4 and args.length_penalty is None  # the run's (decoding.json)
    args = parser.parse_args(["translate", "run", "--checkpoint", "r", "hello", "world"])
    assert args.func is cmd_run and args.text == ["hello", "world"]


def test_demo_corpus_prefixes_need_no_files():
    assert len(load_corpora(["demo:train", "demo:test"])) == len(demo_corpus.generate())
