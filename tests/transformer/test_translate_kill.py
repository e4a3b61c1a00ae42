"""`translate train` killed with SIGKILL at a random moment resumes to the uninterrupted run, bit for bit."""

import sys
from pathlib import Path

import pytest
import torch
from helpers import kill_resume_and_compare_logs

from fromscratch.engine.checkpoint import checkpoint_dir, load_model_weights


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

    kill_resume_and_compare_logs(command, straight, killed, max_steps=50, steps=(11, 45))
    a = load_model_weights(checkpoint_dir(straight, "latest") / "model.safetensors")
    b = load_model_weights(checkpoint_dir(killed, "latest") / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert (straight / "tokenizer.json").read_bytes() == (killed / "tokenizer.json").read_bytes()
