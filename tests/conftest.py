"""Shared test fixtures.

The real data lives at ../shared/data beside the checkout (or wherever FROMSCRATCH_DATA points);
CI has it at the same place. Tests that need it fail loudly when it is missing rather than
skipping, so a green run always means the real-data tests ran.
"""

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    path = Path(os.environ.get("FROMSCRATCH_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        raise FileNotFoundError(
            f"shared data not found at {path}; set FROMSCRATCH_DATA to the folder described in "
            "the README (it holds en-id/, text/, tokenizers/)"
        )
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return shared_data_dir()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def shakespeare(shared_data, tmp_path_factory) -> Path:
    """The first 60 kB of TinyShakespeare (about 32k tokens with a 512-piece BPE): the Llama and
    MoE training tests' text."""
    path = tmp_path_factory.mktemp("text") / "shakespeare.txt"
    text = (shared_data / "text" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    path.write_text(text[:60_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def shakespeare_tokenizer(shakespeare, tmp_path_factory) -> Path:
    """A 512-piece SentencePiece BPE trained on `shakespeare` (`llama.tokenizer.train_tokenizer`)."""
    from fromscratch.llama.tokenizer import train_tokenizer

    return train_tokenizer([shakespeare], 512, tmp_path_factory.mktemp("tokenizer") / "shakespeare")
