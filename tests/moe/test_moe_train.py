"""`fromscratch moe train|generate|inspect` end to end on real text, and the engine's promises for
the MoE: a run killed with SIGKILL and resumed ends bit for bit where an uninterrupted one ends;
two processes (torchrun-style, Gloo) end where one process does, also when experts receive no
tokens on a process; bias balancing runs after every optimizer step; the routing statistics are
logged per step."""

import contextlib
import io
import json
import math
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from helpers import kill_resume_and_compare_logs

from fromscratch.cli import main
from fromscratch.engine.checkpoint import checkpoint_dir, load_model_weights
from fromscratch.engine.metrics import read_csv
from fromscratch.llama.model import Llama
from fromscratch.llama.tokenizer import Tokenizer
from fromscratch.moe import MoEConfig, MoELlama, train
from fromscratch.moe.training import MoELanguageModelTask

VOCAB = 512  # the pieces of `shakespeare_tokenizer` (conftest.py)
SMALL = ["--preset", "tiny", "--seq-len", "64", "--warmup-steps", "10", "--lr", "3e-3", "--device", "cpu"]


def cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def trained_run(shakespeare, tmp_path_factory) -> tuple[Path, str]:
    """`moe train` for 80 steps with bias balancing, its tokenizer trained by the command: (run dir, stdout)."""
    run_dir = tmp_path_factory.mktemp("runs") / "moe"
    code, out, err = cli("moe", "train", "--data", shakespeare, "--out", run_dir, *SMALL, "--vocab-size", VOCAB,
                         "--n-experts", 4, "--top-k", 2, "--balance", "bias", "--batch-size", 16,
                         "--max-steps", 80, "--eval-every", 40, "--save-every", 40)
    assert code == 0, err
    return run_dir, out


# --- training -------------------------------------------------------------------------------------


def test_train_learns_logs_the_routing_and_leaves_a_loadable_run(trained_run):
    run_dir, out = trained_run
    steps, evals = read_csv(run_dir / "metrics.csv"), read_csv(run_dir / "eval.csv")
    assert [int(r["step"]) for r in steps] == list(range(1, 81)) and [int(r["step"]) for r in evals] == [40, 80]
    assert abs(steps[0]["loss"] - math.log(VOCAB)) < 0.3
    assert evals[-1]["val_loss"] < 0.75 * math.log(VOCAB) and evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert "sample @ 80:" in out
    for row in steps:  # per sparse block: the share of each expert, max/mean, entropy, dropped
        for i in (0, 1):
            shares = [row[f"moe{i}_load{e}"] for e in range(4)]
            assert sum(shares) == pytest.approx(1.0) and row[f"moe{i}_max_mean"] == pytest.approx(4 * max(shares))
            assert 0 < row[f"moe{i}_entropy"] <= math.log(4) + 1e-6 and row[f"moe{i}_dropped"] == 0
            assert 0.5 < row[f"moe{i}_lb_loss"] < 4  # (the bias chooses: f and P need not agree)
        assert row["router_loss"] > 0  # balance "bias": the z-loss alone

    model = MoELlama.from_pretrained(run_dir)
    assert model.config.balance == "bias" and model.config.n_experts == 4
    # The bias was updated after each step: ±1e-3 per step, so a multiple of it, and not zero.
    bias = model.layers[0].feed_forward.router.expert_bias
    assert bias.abs().sum() > 0 and torch.allclose(bias / 1e-3, (bias / 1e-3).round(), atol=1e-3)
    # The run's model reproduces the logged validation loss (the cross-entropy alone).
    meta = json.loads((run_dir / "data" / "meta.json").read_text())
    val = np.fromfile(run_dir / "data" / "val.bin", dtype=meta["dtype"]).astype(np.int64)
    rows = min(64, (len(val) - 1) // 64)
    windows = torch.from_numpy(np.stack([val[r * 64: r * 64 + 65] for r in range(rows)]))
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(windows[:, :-1]).flatten(0, 1), windows[:, 1:].flatten())
    assert loss.item() == pytest.approx(evals[-1]["val_loss"], abs=1e-4)
    with pytest.raises(Exception, match="holds a moe run"):
        Llama.from_pretrained(run_dir)


def test_train_help_lists_the_flags():
    code, out, _ = cli("moe", "train", "--help")
    assert code == 0
    for flag in ("--data", "--out", "--preset", "--n-experts", "--top-k", "--balance", "--capacity-factor",
                 "--max-steps", "--batch-size", "--seed", "--resume", "--tokenizer", "--seq-len", "--grad-accum"):
        assert flag in out, flag
    assert "{aux,bias,none}" in out


@pytest.mark.parametrize("flags, expected", [
    (["--n-experts", "4", "--top-k", "5"], r"top_k (5) must be between 1 and n_experts (4)"),
    (["--capacity-factor", "0"], "capacity_factor must be positive"),
    (["--preset", "huge"], "unknown MoE preset 'huge'"),
    (["--resume"], "holds no checkpoint to resume from"),
])
def test_bad_arguments_fail_before_any_work(shakespeare, tmp_path, flags, expected):
    code, stdout, stderr = cli("moe", "train", "--data", shakespeare, "--out", tmp_path / "run", *flags)
    assert code == 2 and stdout == "" and stderr.count("\n") == 1 and expected in stderr, stderr
    assert not (tmp_path / "run").exists()
    code, _, stderr = cli("moe", "train", "--data", shakespeare, "--out", tmp_path / "run", "--balance", "loss")
    assert code == 2 and "invalid choice: 'loss'" in stderr


def test_resume_with_other_routing_is_refused(trained_run, shakespeare):
    code, _, stderr = cli("moe", "train", "--data", shakespeare, "--out", trained_run[0], "--seq-len", 64,
                          "--batch-size", 16, "--n-experts", 4, "--balance", "aux", "--max-steps", 90, "--resume")
    assert code == 2 and "balance='bias' (asked now: 'aux')" in stderr, stderr


def test_flops_per_token_count_the_active_experts_only():
    config = MoEConfig.from_preset("tiny", n_experts=8, top_k=2)
    task = MoELanguageModelTask(config, batch_size=2, seq_len=32, seed=0)
    dense_part = task.model.num_parameters() - config.vocab_size * config.d_model
    idle = 2 * (8 - 2) * 3 * config.expert_dim * config.d_model  # 2 sparse blocks, 6 idle experts each
    assert task.flops_per_token() == 6 * (dense_part - idle) + 12 * config.n_layers * config.d_model * 32


# --- generate and inspect -------------------------------------------------------------------------


def test_generate_from_a_run_streams_the_greedy_continuation(trained_run):
    run_dir = trained_run[0]
    code, out, err = cli("moe", "generate", "--device", "cpu", "--checkpoint", run_dir, "--prompt", "ROMEO:",
                         "--temperature", 0, "--max-new-tokens", 30)
    assert code == 0, err
    model, tokenizer = MoELlama.from_pretrained(run_dir), Tokenizer(run_dir / "tokenizer.model")
    ids = tokenizer.encode("ROMEO:", bos=True)
    new = model.generate(ids, max_new_tokens=30, temperature=0, eos_id=tokenizer.eos_id)[len(ids):]
    if tokenizer.bos_id in new:
        new = new[: new.index(tokenizer.bos_id)]
    assert len(new) >= 5 and out == tokenizer.decode(ids + new) + "\n"
    code, _, err = cli("moe", "generate", "--checkpoint", run_dir, "--prompt", "x", "--top-p", 2)
    assert code == 2 and "top_p must be in (0, 1]" in err


def test_inspect_draws_the_expert_shares_and_lists_their_tokens(trained_run, shakespeare, tmp_path):
    run_dir = trained_run[0]
    code, out, err = cli("moe", "inspect", "--device", "cpu", "--checkpoint", run_dir, "--data", shakespeare,
                         "--out", tmp_path / "experts.png", "--max-tokens", 4000, "--top", 3)
    assert code == 0, err
    assert (tmp_path / "experts.png").stat().st_size > 10_000
    lines = out.splitlines()
    assert lines[0].startswith("4,000 tokens") or lines[0].startswith("3,")
    blocks = [line for line in lines if line.startswith("block ")]
    experts = [line for line in lines if line.strip().startswith("expert ")]
    assert blocks == ["block 0:", "block 1:"] and len(experts) == 8
    shares = [float(line.split(":")[1].split("%")[0]) for line in experts]
    assert sum(shares[:4]) == pytest.approx(100, abs=0.5) and sum(shares[4:]) == pytest.approx(100, abs=0.5)
    code, _, err = cli("moe", "inspect", "--checkpoint", run_dir, "--data", tmp_path / "none.txt", "--out",
                       tmp_path / "x.png")
    assert code == 2 and "no such file" in err


# --- kill -9, then --resume: bit for bit ----------------------------------------------------------


@pytest.mark.slow  # ~30 s: three processes, two side by side
def test_kill_9_then_resume_is_bit_identical_to_an_uninterrupted_run(shakespeare, shakespeare_tokenizer, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    def command(out: Path, *extra) -> list[str]:
        return [sys.executable, "-m", "fromscratch", "moe", "train", "--data", str(shakespeare),
                "--tokenizer", str(shakespeare_tokenizer), "--out", str(out), *SMALL, "--balance", "bias",
                "--batch-size", "8", "--max-steps", "60", "--save-every", "10", "--eval-every", "30",
                "--seed", "5", *extra]

    kill_resume_and_compare_logs(command, straight, killed, max_steps=60, steps=(11, 55))
    a, b = MoELlama.from_pretrained(straight).state_dict(), MoELlama.from_pretrained(killed).state_dict()
    assert a.keys() == b.keys() and "layers.0.feed_forward.router.expert_bias" in a
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    loads = [[r[f"moe1_load{e}"] for e in range(4)] for r in read_csv(straight / "metrics.csv")]
    assert loads == [[r[f"moe1_load{e}"] for e in range(4)] for r in read_csv(killed / "metrics.csv")]


# --- two processes equal one ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# 16 experts, top-1, each process's micro-batch one row of 8 tokens: at most 8 of the 16 experts
# receive a token on a process at each step, so at least half get none. Adam's eps is large: with
# the usual 1e-8, a gradient element near 0 is divided by its own size, and rounding (which sums
# in another order on two processes) becomes an update of ±lr; at 1e-3 the update stays close to
# linear in the gradient, so the comparison sees the gradients and the bias updates, not that noise.
ROUTING = dict(preset="tiny", seq_len=8, n_experts=16, top_k=1, batch_size=2, max_steps=6, eval_every=100,
               save_every=3, lr=3e-3, warmup_steps=2, eps=1e-3, device="cpu", seed=3)


def _run(data, tokenizer, out, balance, grad_accum):
    torch.set_num_threads(1)
    os.environ["TQDM_DISABLE"] = "1"
    train(str(data), str(out), tokenizer=str(tokenizer), balance=balance, grad_accum=grad_accum, **ROUTING)


def _worker(rank, port, data, tokenizer, out, balance):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    _run(data, tokenizer, out, balance, grad_accum=1)


@pytest.mark.slow  # ~25 s each: a run, then two processes started
@pytest.mark.parametrize("balance, grad_accum", [("bias", 1), ("aux", 2)])
def test_two_processes_equal_one_also_with_idle_experts(shakespeare, shakespeare_tokenizer, tmp_path, balance,
                                                         grad_accum):
    """Balance "bias" (the cross-entropy and z-loss add up over processes; the bias update sums the
    counts over them) against one process on the whole batch; balance "aux", whose load-balancing
    loss is each micro-batch's own, against one process accumulating the same two micro-batches."""
    assert ROUTING["batch_size"] // 2 * ROUTING["seq_len"] * ROUTING["top_k"] < ROUTING["n_experts"]
    _run(shakespeare, shakespeare_tokenizer, tmp_path / "one", balance, grad_accum)
    mp.spawn(_worker, args=(_free_port(), str(shakespeare), str(shakespeare_tokenizer), str(tmp_path / "two"), balance),
             nprocs=2, join=True)
    one, two = (load_model_weights(checkpoint_dir(tmp_path / run, "latest") / "model.safetensors")
                for run in ("one", "two"))
    assert one.keys() == two.keys()
    for name in one:
        if name.endswith("expert_bias"):
            assert torch.equal(one[name], two[name]) and one[name].abs().sum() > 0, name
        else:
            torch.testing.assert_close(one[name], two[name], rtol=1e-5, atol=1e-6, msg=name)
    logged = {run: read_csv(tmp_path / run / "metrics.csv") for run in ("one", "two")}
    # The loads and entropy are those of the global batch (the load-balancing loss is logged as
    # the mean of the micro-batches' own, so it is not compared here).
    columns = [f"moe{i}_load{e}" for i in (0, 1) for e in range(16)] + ["moe0_entropy", "moe1_entropy"]
    for a, b in zip(logged["one"], logged["two"]):
        assert [a[c] for c in columns] == pytest.approx([b[c] for c in columns], rel=1e-4, abs=1e-6)
