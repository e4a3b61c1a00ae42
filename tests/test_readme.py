"""The Python examples of the root README run as they are and do what they say."""

import contextlib
import io
import re

import pytest

from conftest import REPO_ROOT


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO_ROOT / "README.md").read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_shows_an_example_for_each_model():
    blocks = python_blocks()
    assert any("fromscratch.transformer" in b for b in blocks) and any("fromscratch.llama" in b for b in blocks)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        exec(compile(python_blocks()[index], f"README.md example {index + 1}", "exec"), {})
    assert printed.getvalue().strip()  # each example ends by printing what it made
