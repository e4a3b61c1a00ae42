"""The training engine's promises, on a toy task (see toy_task.py)."""

import json
import math
import os
import signal
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from toy_task import ToyConfig, ToyTask  # noqa: E402

from fromscratch.checkpoints.runs import read_run  # noqa: E402
from fromscratch.engine import Trainer, TrainConfig, TrainingStopped  # noqa: E402
from fromscratch.engine.checkpoint import checkpoint_dir, load_model_weights, read_index  # noqa: E402
from fromscratch.engine.metrics import read_csv  # noqa: E402
from fromscratch.engine.schedules import learning_rate  # noqa: E402
from fromscratch.errors import Interrupted, UserError  # noqa: E402


def config(out, **kw):
    base = dict(out_dir=str(out), max_steps=20, batch_size=8, lr=1e-2, warmup_steps=3, eval_every=5,
                save_every=5, keep_last=2)
    base.update(kw)
    return TrainConfig(**base)


def final_weights(run_dir):
    return load_model_weights(checkpoint_dir(run_dir, "latest") / "model.safetensors")


def test_loss_falls_and_run_directory_is_complete(tmp_path):
    result = Trainer(ToyTask(), config(tmp_path / "run", max_steps=60, save_every=20, eval_every=20)).fit()
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    assert len(rows) == 60
    assert sum(r["loss"] for r in rows[-10:]) / 10 < 0.75 * rows[0]["loss"]
    assert result["eval"]["val_loss"] < 0.75 * math.log(32)
    index = read_index(tmp_path / "run")
    assert index["latest"] == "step-00000060"
    # keep_last=2 plus the best: no more than three checkpoints on disk
    assert len(list((tmp_path / "run" / "checkpoints").iterdir())) <= 3
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["train_config"]["max_steps"] == 60 and record["model_config"]["d_model"] == 16
    hardware = record["hardware"]  # the machine the run's speed belongs to
    assert hardware["type"] == "cpu" and hardware["threads"] == torch.get_num_threads()
    assert hardware["vector"] == torch.backends.cpu.get_cpu_capability()
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


class SignalledTask(ToyTask):
    """Sends itself SIGTERM while fetching the batch of `signal_step`, as a scheduler would."""

    def __init__(self, signal_step, **kw):
        super().__init__(**kw)
        self.signal_step = signal_step

    def global_batch(self, step):
        if step == self.signal_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().global_batch(step)


def test_sigterm_saves_and_resume_is_bitwise_identical(tmp_path):
    Trainer(ToyTask(), config(tmp_path / "straight")).fit()
    with pytest.raises(Interrupted) as stopped:  # the CLI turns it into exit status 128 + 15
        Trainer(SignalledTask(signal_step=12), config(tmp_path / "broken")).fit()
    assert stopped.value.signum == signal.SIGTERM and "step 12" in str(stopped.value)
    assert read_index(tmp_path / "broken")["latest"] == "step-00000012"
    # A fresh process would rebuild the task with a fresh RNG: mimic that by disturbing it.
    torch.manual_seed(999)
    Trainer(ToyTask(seed=0), config(tmp_path / "broken", resume=True)).fit()
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "broken")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    losses = lambda run: [r["loss"] for r in read_csv(tmp_path / run / "metrics.csv")]  # noqa: E731
    assert losses("straight") == losses("broken")


class UnreachedPartTask(ToyTask):
    """A model with a part the loss never reaches (the VLM's image pooler in a run without
    captions): that part gets no gradient, so AdamW keeps no state for it."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.model.unreached = torch.nn.Linear(16, 16)


class SignalledUnreachedPartTask(SignalledTask, UnreachedPartTask):
    pass


def test_a_part_that_never_gets_a_gradient_resumes_bitwise_identical(tmp_path):
    Trainer(UnreachedPartTask(), config(tmp_path / "straight")).fit()
    with pytest.raises(Interrupted):
        Trainer(SignalledUnreachedPartTask(signal_step=12), config(tmp_path / "broken")).fit()
    torch.manual_seed(999)
    Trainer(UnreachedPartTask(seed=0), config(tmp_path / "broken", resume=True)).fit()
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "broken")
    assert "unreached.weight" in a and a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_arguments_fail_before_work(tmp_path):
    with pytest.raises(UserError, match="no checkpoint to resume"):
        Trainer(ToyTask(), config(tmp_path / "none", resume=True))
    with pytest.raises(UserError, match="not divisible"):
        Trainer(ToyTask(), config(tmp_path / "x", batch_size=7, grad_accum=2))
    with pytest.raises(UserError, match="--fsdp"):
        Trainer(ToyTask(), config(tmp_path / "x", fsdp=True))
    with pytest.raises(UserError, match="--dtype"):
        config(tmp_path / "x", dtype="float8")
    Trainer(ToyTask(), config(tmp_path / "run", max_steps=5)).fit()
    with pytest.raises(UserError, match="already holds a run"):
        Trainer(ToyTask(), config(tmp_path / "run", max_steps=5))
    with pytest.raises(UserError, match="d_model=16"):
        Trainer(ToyTask(config=ToyConfig(d_model=24)), config(tmp_path / "run", max_steps=10, resume=True))
    with pytest.raises(UserError, match="batch_size=8"):
        Trainer(ToyTask(), config(tmp_path / "run", max_steps=10, batch_size=16, resume=True))
    assert not (tmp_path / "x").exists()  # nothing was written for the refused runs


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(TrainingStopped, match="at step 8") as err:
        Trainer(ToyTask(nan_at_step=8), config(run)).fit()
    assert "step-00000005" in str(err.value)
    assert read_index(run)["latest"] == "step-00000005"
    weights = final_weights(run)
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_nan_loss_skip_drops_the_update(tmp_path):
    result = Trainer(ToyTask(nan_at_step=18), config(tmp_path / "run", on_nan="skip")).fit()
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    assert [int(r["skipped"]) for r in rows[-3:]] == [1, 1, 1]
    assert result["step"] == 20
    assert all(torch.isfinite(w).all() for w in final_weights(tmp_path / "run").values())


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    cfg = dict(max_steps=6, eval_every=100, save_every=100)
    Trainer(ToyTask(config=ToyConfig(dropout=0.0)), config(tmp_path / "a1", **cfg)).fit()
    Trainer(ToyTask(config=ToyConfig(dropout=0.0)), config(tmp_path / "a4", grad_accum=4, **cfg)).fit()
    a, b = final_weights(tmp_path / "a1"), final_weights(tmp_path / "a4")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_learning_rate_schedules():
    cos = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, schedule="cosine")
    assert learning_rate(5, cos) == pytest.approx(0.5)
    assert learning_rate(10, cos) == pytest.approx(1.0)
    assert learning_rate(60, cos) == pytest.approx(0.55)
    assert learning_rate(110, cos) == pytest.approx(0.1)
    noam = TrainConfig(lr=1.0, warmup_steps=4000, noam_d_model=512, schedule="noam")
    peak = 512**-0.5 * 4000**-0.5
    assert learning_rate(4000, noam) == pytest.approx(peak)
    assert learning_rate(2000, noam) == pytest.approx(peak / 2)
    assert learning_rate(16000, noam) == pytest.approx(peak / 2)


def test_a_run_directory_stands_for_its_best_checkpoint_else_its_latest(tmp_path):
    run = tmp_path / "run"
    Trainer(ToyTask(), config(run)).fit()
    weights, model_config, step_dir, run_dir = read_run(run, ToyTask.model_name)
    index = json.loads((run / "checkpoints.json").read_text())
    assert step_dir == run / "checkpoints" / index["best"] and run_dir == run
    assert model_config == ToyConfig().to_dict()
    assert set(weights) == set(ToyTask().model.state_dict())
    latest = run / "checkpoints" / index["latest"]
    assert read_run(latest, ToyTask.model_name)[2] == latest  # a step directory stands for itself
    index.pop("best")
    (run / "checkpoints.json").write_text(json.dumps(index))
    assert read_run(run, ToyTask.model_name)[2] == latest  # no best recorded: the latest
    with pytest.raises(UserError, match="not a training run"):
        read_run(tmp_path, ToyTask.model_name)
    with pytest.raises(UserError, match="holds a toy run"):
        read_run(run, "llama")


def test_bfloat16_autocast_trains_on_cpu(tmp_path):
    result = Trainer(ToyTask(), config(tmp_path / "run", dtype="bfloat16", max_steps=30)).fit()
    assert result["eval"]["val_loss"] < math.log(32)


def test_float16_with_gradient_scaler_runs(tmp_path):
    result = Trainer(ToyTask(), config(tmp_path / "run", dtype="float16", max_steps=10)).fit()
    state = json.loads((checkpoint_dir(tmp_path / "run") / "trainer_state.json").read_text())
    assert state["scaler"] is not None and math.isfinite(result["train"]["loss"])


# --- several processes (Gloo on CPU) ----------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, out, grad_accum, fsdp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    task = ToyTask(config=ToyConfig(dropout=0.0))
    Trainer(task, config(out, max_steps=10, eval_every=100, save_every=5, grad_accum=grad_accum, fsdp=fsdp)).fit()


@pytest.mark.parametrize("grad_accum,fsdp", [(1, False), (2, False), (1, True)], ids=["ddp", "ddp-accum", "fsdp"])
def test_two_processes_equal_one(tmp_path, grad_accum, fsdp):
    Trainer(ToyTask(config=ToyConfig(dropout=0.0)), config(tmp_path / "one", max_steps=10, eval_every=100)).fit()
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "two"), grad_accum, fsdp), nprocs=2, join=True)
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    assert (tmp_path / "two" / "checkpoints" / "step-00000010" / "rng-rank1.safetensors").exists()


def test_time_budget_stops_and_saves(tmp_path):
    result = Trainer(ToyTask(), config(tmp_path / "run", max_minutes=1e-9)).fit()
    assert result["step"] == 1
    assert read_index(tmp_path / "run")["latest"] == "step-00000001"


@pytest.mark.slow
def test_compiled_model_trains(tmp_path):
    result = Trainer(ToyTask(), config(tmp_path / "run", compile=True, max_steps=20)).fit()
    assert result["eval"]["val_loss"] < math.log(32)


def test_mfu_is_logged_from_the_peak_flops(tmp_path):
    task = ToyTask()
    Trainer(task, config(tmp_path / "run", max_steps=5, peak_flops=1e9)).fit()
    for row in read_csv(tmp_path / "run" / "metrics.csv"):
        assert row["mfu"] == pytest.approx(task.flops_per_token() * row["tokens_per_sec"] / 1e9)
    Trainer(ToyTask(), config(tmp_path / "cpu", max_steps=2)).fit()  # no peak known on a CPU
    assert all(math.isnan(r["mfu"]) for r in read_csv(tmp_path / "cpu" / "metrics.csv"))


def test_plot_command_overlays_runs(tmp_path, capsys):
    from fromscratch.cli import main

    Trainer(ToyTask(), config(tmp_path / "a", max_steps=5)).fit()
    Trainer(ToyTask(seed=1), config(tmp_path / "b", max_steps=5)).fit()
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "runs.png")]) == 0
    assert (tmp_path / "runs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_a_run_that_ends_on_the_clock_is_evaluated_at_its_last_step(tmp_path):
    result = Trainer(ToyTask(), config(tmp_path / "run", max_steps=10_000, eval_every=10_000,
                                       max_minutes=0.02)).fit()
    evals = read_csv(tmp_path / "run" / "eval.csv")
    assert 0 < result["step"] < 10_000 and evals[-1]["step"] == result["step"]


def test_cooldown_falls_linearly_over_the_last_share_of_the_steps(tmp_path):
    """--cooldown 0.2 of 50 steps: the schedule's rate until step 40, then scaled down linearly to
    1/11 of it at step 50 (Hägele et al. 2024's warm-up–stable–decay, on any schedule)."""
    from fromscratch.engine.schedules import cooldown_window

    cfg = config(tmp_path / "run", max_steps=50, schedule="constant", warmup_steps=0, lr=0.01, cooldown=0.2)
    assert cooldown_window(cfg) == (40, 10)
    Trainer(ToyTask(), cfg).fit()
    lrs = [row["lr"] for row in read_csv(tmp_path / "run" / "metrics.csv")]
    assert lrs[:40] == [0.01] * 40
    assert lrs[40:] == pytest.approx([0.01 * (1 - k / 11) for k in range(1, 11)])
    with pytest.raises(UserError, match="--cooldown must be a share of the run in"):
        TrainConfig(cooldown=1.0)


def test_more_steps_on_resume_move_a_cooldown_not_begun_and_refuse_one_begun(tmp_path):
    """A run of 20 steps with --cooldown 0.2 plans its cooldown after step 16. Stopped at step 12
    and resumed with --max-steps 30, it cools down after step 24 and ends as a straight 30-step
    run does; resumed at its end, where the rate reached its lowest, more steps are refused
    (they would have trained at a rate of 0), before anything is written."""
    settings = dict(schedule="constant", warmup_steps=0, lr=0.01, cooldown=0.2)
    Trainer(ToyTask(), config(tmp_path / "straight", max_steps=30, **settings)).fit()
    with pytest.raises(Interrupted):
        Trainer(SignalledTask(signal_step=12), config(tmp_path / "longer", max_steps=20, **settings)).fit()
    torch.manual_seed(999)
    Trainer(ToyTask(seed=0), config(tmp_path / "longer", max_steps=30, resume=True, **settings)).fit()
    lrs = [row["lr"] for row in read_csv(tmp_path / "longer" / "metrics.csv")]
    assert lrs[:24] == [0.01] * 24 and lrs[24:] == pytest.approx([0.01 * (1 - k / 7) for k in range(1, 7)])
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "longer")
    assert all(torch.equal(a[name], b[name]) for name in a)

    Trainer(ToyTask(), config(tmp_path / "done", max_steps=20, **settings)).fit()
    record = (tmp_path / "done" / "run.json").read_text()
    with pytest.raises(UserError, match="cooldown began after step 16 .* Resume with --max-steps 20"):
        Trainer(ToyTask(), config(tmp_path / "done", max_steps=30, resume=True, **settings))
    assert (tmp_path / "done" / "run.json").read_text() == record


class FakeClock:
    """time.perf_counter for the trainer: half a second further at every call."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 0.5
        return self.now


def test_cooldown_on_the_clock_is_decided_once_and_survives_a_resume(tmp_path, monkeypatch, capsys):
    """With --max-minutes 1 and --cooldown 0.25, the rate starts falling at the first step past
    45 s, for as many steps as the last 15 s hold at the rate so far, and the run ends at the last
    of them. The window is kept in the checkpoint: a run stopped inside it resumes bit for bit."""
    from fromscratch.engine import trainer as trainer_module

    monkeypatch.setattr(trainer_module.time, "perf_counter", FakeClock())
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    settings = dict(max_steps=10_000, schedule="constant", warmup_steps=0, lr=0.01, cooldown=0.25, max_minutes=1,
                    eval_every=10_000, save_every=10_000)
    straight = Trainer(ToyTask(), config(tmp_path / "straight", **settings)).fit()
    assert f"ended at step {straight['step']}: training is done" in capsys.readouterr().out
    lrs = [row["lr"] for row in read_csv(tmp_path / "straight" / "metrics.csv")]
    start = lrs.index(next(lr for lr in lrs if lr < 0.01))  # steps at the full rate
    steps = straight["step"] - start
    assert 0.2 * start <= steps <= 0.5 * start  # ~15 s after ~45 s at the same pace
    assert lrs[start:] == pytest.approx([0.01 * (1 - k / (steps + 1)) for k in range(1, steps + 1)])
    state = json.loads((checkpoint_dir(tmp_path / "straight", "latest") / "trainer_state.json").read_text())
    assert state["cooldown"] == [start, steps]

    monkeypatch.setattr(trainer_module.time, "perf_counter", FakeClock())
    with pytest.raises(Interrupted):
        Trainer(SignalledTask(signal_step=start + 2), config(tmp_path / "broken", **settings)).fit()
    torch.manual_seed(999)
    Trainer(ToyTask(seed=0), config(tmp_path / "broken", resume=True, **settings)).fit()
    losses = lambda run: [r["loss"] for r in read_csv(tmp_path / run / "metrics.csv")]  # noqa: E731
    assert losses("broken") == losses("straight")
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "broken")
    assert all(torch.equal(a[name], b[name]) for name in a)


class DropoutWatchingTask(ToyTask):
    """Records, for each training step, whether the model's dropout layer was on."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.dropout_on = {}

    def loss(self, model, batch):
        if batch["step"] < 10**9:  # not the evaluation's batch
            assert model.training and model.hidden.training  # only the dropout layer is switched
            self.dropout_on[batch["step"]] = model.dropout.training
        return super().loss(model, batch)


def test_late_dropout_is_off_until_its_step_through_evaluations_and_a_resume(tmp_path):
    task = DropoutWatchingTask()
    Trainer(task, config(tmp_path / "straight", dropout_from=12)).fit()  # evaluations at 5 and 10 on the way
    assert [step for step, on in task.dropout_on.items() if not on] == list(range(1, 13))
    assert all(task.dropout_on[step] for step in range(13, 21))
    never = Trainer(ToyTask(), config(tmp_path / "never", dropout_from=20)).fit()
    assert never["train"]["loss"] != read_csv(tmp_path / "straight" / "metrics.csv")[-1]["loss"]
    with pytest.raises(Interrupted):  # stopped while the dropout is still off, resumed across the switch
        Trainer(SignalledTask(signal_step=8), config(tmp_path / "broken", dropout_from=12)).fit()
    torch.manual_seed(999)
    Trainer(ToyTask(), config(tmp_path / "broken", dropout_from=12, resume=True)).fit()
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "broken")
    assert all(torch.equal(a[name], b[name]) for name in a)
    with pytest.raises(UserError, match="--dropout-from"):
        config(tmp_path / "bad", dropout_from=-1)


def test_late_dropout_refuses_a_model_without_dropout_layers(tmp_path):
    task = ToyTask()
    task.model.dropout = torch.nn.Identity()
    with pytest.raises(UserError, match="--dropout-from 5: the toy model has no dropout layers"):
        Trainer(task, config(tmp_path / "run", dropout_from=5)).fit()
