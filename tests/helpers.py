"""Test helpers shared across test folders (tests/ is on sys.path through conftest.py)."""

import random
import signal
import subprocess
import tempfile
import time
from pathlib import Path


def process_output(process: subprocess.Popen) -> str:
    """What the process wrote to its stderr, if it was captured (a pipe or a file)."""
    stream = process.stderr
    if stream is None:
        return ""
    if hasattr(stream, "seek"):
        stream.seek(0)
    return stream.read().decode(errors="replace")


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until `path` exists; fail with the process's stderr if it exits first."""
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, f"the process exited ({process.returncode}):\n{process_output(process)}"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def logged_steps(run_dir: Path) -> int:
    """How many rows metrics.csv holds (one per finished step)."""
    try:
        return max(Path(run_dir, "metrics.csv").read_text().count("\n") - 1, 0)
    except FileNotFoundError:
        return 0


def kill_at_random_after_first_checkpoint(command: list[str], run_dir: Path, env: dict, seed: int,
                                          steps: tuple[int, int] | None = None) -> int | None:
    """Start `command`, wait for its first checkpoint, then SIGKILL it at a random moment.

    The moment is up to half a second after the checkpoint appears; or, with `steps=(a, b)`,
    up to a tenth of a second after step s, drawn uniformly from a..b, is logged in metrics.csv
    (so the kill lands between checkpoints whatever the speed of the machine). Returns s.
    stderr goes to a temporary file, not a pipe: a pipe nobody reads fills up (a progress bar
    writes to it many times a second) and would stall the process before it can be killed.
    """
    rng = random.Random(seed)
    target = rng.randint(*steps) if steps else None
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        wait_for(Path(run_dir) / "checkpoints.json", process, timeout=300)
        deadline = time.time() + 300
        while target is not None and logged_steps(run_dir) < target:
            assert process.poll() is None, f"the process exited ({process.returncode}):\n{process_output(process)}"
            assert time.time() < deadline, f"step {target} never came"
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.5 if target is None else 0.1))
        process.send_signal(signal.SIGKILL)
        code = process.wait()
        assert code == -signal.SIGKILL, (
            f"the run finished (exit {code}) before it could be killed; make it longer\n{process_output(process)}"
        )
    return target
