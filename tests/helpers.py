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
    if stream.seekable():
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


def kill_resume_and_compare_logs(command, straight: Path, killed: Path, max_steps: int, steps: tuple[int, int]) -> int:
    """The damage test of every `train` command, up to comparing weights (which the caller does).

    `command(out_dir, *extra)` builds the command line. One run goes uninterrupted beside another
    that is SIGKILLed at a random step in `steps`, then resumed with --resume to `max_steps`. Checks
    that both logged the same steps with the same losses and evaluations; returns the step the
    killed run resumed from.
    """
    import os

    from fromscratch.engine.checkpoint import read_index
    from fromscratch.engine.metrics import read_csv

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    with open(straight.parent / f"{straight.name}.log", "wb") as log:
        uninterrupted = subprocess.Popen(command(straight), env=env, stdout=log, stderr=subprocess.STDOUT)
        seed = random.SystemRandom().randrange(2**32)
        kill_at_random_after_first_checkpoint(command(killed), killed, env, seed, steps=steps)
        assert uninterrupted.wait() == 0, Path(log.name).read_text()
    resumed_from = int(read_index(killed)["latest"].removeprefix("step-"))
    assert 0 < resumed_from < max_steps, f"seed {seed}: the kill did not land between checkpoints"
    resume = subprocess.run(command(killed, "--resume"), env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert resume.returncode == 0, resume.stderr
    columns = ("step", "loss", "grad_norm", "lr", "tokens")
    logged = {run: [tuple(r[c] for c in columns) for r in read_csv(run / "metrics.csv")] for run in (straight, killed)}
    assert [int(step) for step, *_ in logged[killed]] == list(range(1, max_steps + 1))  # none lost or doubled
    assert logged[straight] == logged[killed]
    assert read_csv(straight / "eval.csv") == read_csv(killed / "eval.csv")
    return resumed_from


def repeats_an_ngram(row: list[int], n: int, start: int = 0) -> bool:
    """Whether a token of `row` at position `start` or later completes an n-gram that `row`
    already holds before it (the prompt, from position 0, may repeat itself)."""
    ngrams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]  # ngrams[i] ends at token i + n − 1
    return any(ngrams[i] in ngrams[:i] for i in range(max(start - n + 1, 0), len(ngrams)))


def hf_llama_weights_to_ours(state: dict, n_heads: int, n_kv_heads: int) -> dict:
    """A Hugging Face Llama-family state dict → ours (Meta's names): q/k rows from HF's half-split
    RoPE order back to Meta's pairs, and the output layer tied to the embedding where HF omits it.
    The loop is the tests' own; it takes only the loader's key renaming and q/k permutation,
    which test_llama_checkpoints checks on their own."""
    from fromscratch.llama.checkpoints import hf_key_to_meta, hf_to_meta_permute

    ours = {}
    for key, tensor in state.items():
        name = hf_key_to_meta(key)
        if name.endswith("attention.wq.weight"):
            tensor = hf_to_meta_permute(tensor, n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = hf_to_meta_permute(tensor, n_kv_heads)
        ours[name] = tensor
    ours.setdefault("output.weight", ours["tok_embeddings.weight"])  # tied: HF may omit lm_head
    return ours
