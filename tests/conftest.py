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
