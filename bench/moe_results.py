"""The MoE README's measured results, from training runs: the dense twin, and the two figures.

    python bench/moe_results.py dense-twin --moe-preset small --data FILE --out DIR [engine flags ...]
    python bench/moe_results.py balance RUN_DIR [RUN_DIR ...] --out PNG       (bench/moe_balance.sh)
    python bench/moe_results.py vs-dense MOE_RUN DENSE_RUN --out PNG          (bench/moe_vs_dense.sh)

dense-twin trains a dense Llama with the same active parameters per token as an MoE preset: the
same attention, embeddings and depth, and one SwiGLU of width top_k·expert_dim (+ the shared
experts') where the MoE has its experts; it differs only by the router (E·d_model weights a
block). `llama train` has no flag for the SwiGLU width, so this calls the function it runs.

balance draws, for runs that differ in --balance, the busiest expert's load over the mean
(moe{i}_max_mean in metrics.csv, averaged over the sparse blocks; 1 = balanced, E/k = every token
on one expert, since a token's k choices are different experts) against the step, and the final
validation loss of each; vs-dense draws the
validation loss of the MoE and its twin against training FLOPs (FLOPs per token × tokens seen)
and against training time (the sum of each step's tokens / tokens_per_sec in metrics.csv, which
leaves out checkpoint writing). Each writes a JSON summary beside its figure.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from fromscratch.checkpoints.safe import read_json_object
from fromscratch.engine.metrics import read_csv
from fromscratch.engine.plot import pyplot, save_figure


def dense_twin(args, engine: list[str]) -> None:
    from fromscratch.engine import add_train_arguments, engine_options
    from fromscratch.llama.training import DEFAULTS, LanguageModelTask, _train
    from fromscratch.llama.config import LlamaConfig
    from fromscratch.moe import MoEConfig

    moe = MoEConfig.from_preset(args.moe_preset)
    shape = {name: getattr(moe, name) for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "multiple_of",
                                                    "norm_eps", "rope_theta", "max_seq_len", "tie_embeddings")}
    shape["ffn_hidden_dim"] = (moe.top_k + moe.n_shared_experts) * moe.expert_dim
    parser = argparse.ArgumentParser(prog="dense-twin engine flags")
    add_train_arguments(parser, DEFAULTS)
    options = engine_options(parser.parse_args(["--out", args.out, *engine]))
    print(f"dense twin of MoE preset {args.moe_preset}: {shape}")
    _train(LanguageModelTask, LlamaConfig, args.data, args.out, "small", args.tokenizer, args.vocab_size,
           args.seq_len, ["bench/moe_results.py", *sys.argv[1:]], options, model_overrides=shape)


def flops_per_token(run: Path) -> float:
    """The training FLOPs per token of a run's model, as its task counts them (active parameters)."""
    import torch

    record = read_json_object(run / "run.json")
    seq_len = read_json_object(run / "task.json")["seq_len"]
    if record["model"] == "moe":
        from fromscratch.moe import MoEConfig
        from fromscratch.moe.training import MoELanguageModelTask as task_class

        config = MoEConfig.from_dict(record["model_config"])
    else:
        from fromscratch.llama.config import LlamaConfig
        from fromscratch.llama.training import LanguageModelTask as task_class

        config = LlamaConfig.from_dict(record["model_config"])
    with torch.device("meta"):  # shapes only
        return task_class(config, batch_size=1, seq_len=seq_len, seed=0).flops_per_token()


def curves(run: Path) -> dict:
    train, evals = read_csv(run / "metrics.csv"), read_csv(run / "eval.csv")
    if not train or not evals:
        raise SystemExit(f"{run}: no metrics.csv or eval.csv rows yet")
    step_time = np.cumsum([r["tokens"] - (train[i - 1]["tokens"] if i else 0) for i, r in enumerate(train)]
                          / np.array([r["tokens_per_sec"] for r in train]))
    by_step = {int(r["step"]): (r["tokens"], t) for r, t in zip(train, step_time)}
    eval_steps = [int(r["step"]) for r in evals if int(r["step"]) in by_step]
    return {"steps": [int(r["step"]) for r in train], "train": train, "eval_steps": eval_steps,
            "val_loss": [r["val_loss"] for r in evals if int(r["step"]) in by_step],
            "tokens": [by_step[s][0] for s in eval_steps], "seconds": [by_step[s][1] for s in eval_steps]}


def plot_balance(runs: list[Path], out: Path) -> dict:
    plt = pyplot()
    fig, (ax_load, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2.2, 1]})
    summary = {}
    for run in runs:
        c = curves(run)
        config = read_json_object(run / "model_config.json")
        columns = sorted(k for k in c["train"][0] if k.endswith("_max_mean"))
        imbalance = np.mean([[r[k] for k in columns] for r in c["train"]], axis=1)  # mean over sparse blocks
        label = f"{run.name} (--balance {config['balance']})"
        ax_load.plot(c["steps"], imbalance, lw=0.8, label=label)
        ax_loss.bar(run.name, c["val_loss"][-1])
        summary[run.name] = {"balance": config["balance"], "steps": c["steps"][-1],
                             "final_val_loss": c["val_loss"][-1],
                             "max_mean_load_last_50_steps": float(np.mean(imbalance[-50:])),
                             "max_mean_load_first_50_steps": float(np.mean(imbalance[:50])),
                             "n_experts": config["n_experts"], "top_k": config["top_k"]}
    # A token takes top_k different experts, so one expert holds at most 1/top_k of the slots.
    collapsed = summary[runs[0].name]["n_experts"] / summary[runs[0].name]["top_k"]
    ax_load.axhline(1, color="grey", lw=0.6, ls="--")
    ax_load.set(title=f"busiest expert's load / mean load (mean over sparse blocks; 1 = balanced, "
                      f"{collapsed:g} = every token on it)",
                xlabel="step", ylabel="max / mean load")
    ax_load.title.set_fontsize(9)
    ax_load.legend(fontsize=8)
    ax_loss.set(title="final validation loss", ylabel="cross-entropy (nats)")
    low = min(s["final_val_loss"] for s in summary.values())
    ax_loss.set_ylim(low * 0.95, max(s["final_val_loss"] for s in summary.values()) * 1.02)
    for ax in (ax_load, ax_loss):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out, dpi=110)
    return summary


def plot_vs_dense(moe: Path, dense: Path, out: Path) -> dict:
    plt = pyplot()
    fig, (ax_flops, ax_time) = plt.subplots(1, 2, figsize=(12, 4.2))
    summary = {}
    for run in (moe, dense):
        c, per_token = curves(run), flops_per_token(run)
        flops = np.array(c["tokens"]) * per_token
        ax_flops.plot(flops, c["val_loss"], "o-", ms=3, label=run.name)
        ax_time.plot(np.array(c["seconds"]) / 60, c["val_loss"], "o-", ms=3, label=run.name)
        summary[run.name] = {"model": read_json_object(run / "run.json")["model"], "flops_per_token": per_token,
                             "steps": c["steps"][-1], "tokens": c["tokens"][-1], "training_flops": float(flops[-1]),
                             "training_minutes": c["seconds"][-1] / 60, "final_val_loss": c["val_loss"][-1],
                             "curve": {"flops": flops.tolist(), "minutes": (np.array(c["seconds"]) / 60).tolist(),
                                       "val_loss": c["val_loss"]}}
    # Each run's validation loss where both have been: at the smaller final budget, interpolated.
    runs = list(summary.values())
    for axis, key in (("flops", "at_equal_flops"), ("minutes", "at_equal_minutes")):
        budget = min(s["curve"][axis][-1] for s in runs)
        for s in runs:
            s[f"val_loss_{key}"] = float(np.interp(budget, s["curve"][axis], s["curve"]["val_loss"]))
        summary[f"budget_{key}"] = budget
    ax_flops.set(title="validation loss against training FLOPs", xlabel="FLOPs (6·active parameters + attention, per token)",
                 ylabel="cross-entropy (nats)", xscale="log")
    ax_time.set(title="validation loss against training time on this machine", xlabel="minutes",
                ylabel="cross-entropy (nats)")
    for ax in (ax_flops, ax_time):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out, dpi=110)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    twin = commands.add_parser("dense-twin", help="train the dense twin of an MoE preset (engine flags follow)")
    twin.add_argument("--moe-preset", default="small")
    twin.add_argument("--data", nargs="+", required=True)
    twin.add_argument("--out", required=True)
    twin.add_argument("--tokenizer")
    twin.add_argument("--vocab-size", type=int, default=2048)
    twin.add_argument("--seq-len", type=int)
    balance = commands.add_parser("balance")
    balance.add_argument("runs", nargs="+", type=Path)
    balance.add_argument("--out", type=Path, required=True)
    vs_dense = commands.add_parser("vs-dense")
    vs_dense.add_argument("moe", type=Path)
    vs_dense.add_argument("dense", type=Path)
    vs_dense.add_argument("--out", type=Path, required=True)
    args, engine = parser.parse_known_args()
    if args.command == "dense-twin":
        dense_twin(args, engine)
        return
    if engine:
        parser.error(f"unrecognized arguments: {' '.join(engine)}")
    summary = plot_balance(args.runs, args.out) if args.command == "balance" else plot_vs_dense(args.moe, args.dense, args.out)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "curve"} if isinstance(v, dict) else v)
                      for k, v in summary.items()}, indent=2))
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
