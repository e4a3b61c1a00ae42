"""`translate train` killed with SIGKILL at a random moment resumes to the uninterrupted run, bit for bit."""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import kill_at_random_after_first_checkpoint

from fromscratch.engine import load_run
from fromscratch.engine.checkpoint import read_index
from fromscratch.engine.metrics import read_csv


@pytest.fixture
def small_corpus(shared_data, tmp_path) -> Path:
    prefix = tmp_path / "tatoeba-1200"
    for lang in ("en", "id"):
        lines = (shared_data / "en-id" / f"tatoeba.{lang}").read_text(encoding="utf-8").splitlines()[:1200]
        prefix.with_suffix(f".{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return prefix


@pytest.mark.slow
def test_kill_9_then_resume_is_bit_identical_to_an_uninterrupted_run(small_corpus, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    def command(out: Path, *extra) -> list[str]:
        return [sys.executable, "-m", "fromscratch", "translate", "train", "--train", str(small_corpus),
                "--valid", str(small_corpus), "--out", str(out), "--preset", "tiny", "--vocab-size", "400",
                "--batch-tokens", "400", "--max-steps", "50", "--warmup-steps", "20", "--save-every", "10",
                "--eval-every", "25", "--bleu-samples", "8", "--seed", "3", "--device", "cpu", *extra]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    with open(tmp_path / "straight.log", "wb") as log:
        uninterrupted = subprocess.Popen(command(straight), env=env, stdout=log, stderr=subprocess.STDOUT)
        seed = random.SystemRandom().randrange(2**32)
        kill_at_random_after_first_checkpoint(command(killed), killed, env, seed, steps=(11, 45))
        assert uninterrupted.wait() == 0, (tmp_path / "straight.log").read_text()
    resumed_from = int(read_index(killed)["latest"].removeprefix("step-"))
    assert 10 <= resumed_from < 50, seed
    resume = subprocess.run(command(killed, "--resume"), env=env, capture_output=True, text=True)
    assert resume.returncode == 0, resume.stderr

    a, _, _ = load_run(straight, which="latest")
    b, _, _ = load_run(killed, which="latest")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    columns = ("step", "loss", "grad_norm", "lr", "tokens")
    logged = {run: [tuple(r[c] for c in columns) for r in read_csv(run / "metrics.csv")] for run in (straight, killed)}
    assert [int(step) for step, *_ in logged[killed]] == list(range(1, 51))
    assert logged[straight] == logged[killed]
    assert read_csv(straight / "eval.csv") == read_csv(killed / "eval.csv")
    assert (straight / "tokenizer.json").read_bytes() == (killed / "tokenizer.json").read_bytes()
