"""Damage done for real: `kill -9` at a random moment, and `kill -9` in the middle of a save."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from helpers import wait_for

from fromscratch.engine.checkpoint import checkpoint_dir, load_model_weights, read_index

HERE = Path(__file__).parent

# Trains the toy task in its own process; the save of step 20 hangs half-way through writing the
# model file (after a marker file announces it), so the test can kill the process mid-save.
SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {here!r})
    from toy_task import ToyTask
    from fromscratch.engine import Trainer, TrainConfig
    from fromscratch.engine import checkpoint as ckpt

    out, hang = sys.argv[1], sys.argv[2] == "hang"
    real_save = ckpt.save_model_weights
    def slow_save(state_dict, path):
        if hang and ".step-00000020.tmp" in str(path):
            Path(path).write_bytes(b"half a file")
            Path(out, "SAVING").touch()
            time.sleep(60)
        real_save(state_dict, path)
    ckpt.save_model_weights = slow_save
    resume = (Path(out) / "checkpoints.json").exists()
    Trainer(ToyTask(), TrainConfig(out_dir=out, max_steps=30, batch_size=8, lr=1e-2, warmup_steps=3,
                                   eval_every=10, save_every=10, resume=resume)).fit()
    """
)


def run_toy(out: Path, hang: bool) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-c", SCRIPT.format(here=str(HERE)), str(out), "hang" if hang else "ok"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_kill_during_save_leaves_previous_checkpoint(tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert run_toy(straight, hang=False).wait() == 0
    process = run_toy(broken, hang=True)
    wait_for(broken / "SAVING", process)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    # The half-written checkpoint is invisible: the index still names step 10, which loads.
    assert read_index(broken)["latest"] == "step-00000010"
    assert (broken / "checkpoints" / ".step-00000020.tmp").exists()
    weights = load_model_weights(checkpoint_dir(broken) / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    # Resuming cleans the temporary directory up and ends exactly where the straight run did.
    process = run_toy(broken, hang=False)
    assert process.wait() == 0, process.stderr.read().decode()
    assert not (broken / "checkpoints" / ".step-00000020.tmp").exists()
    a = load_model_weights(checkpoint_dir(straight) / "model.safetensors")
    b = load_model_weights(checkpoint_dir(broken) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

