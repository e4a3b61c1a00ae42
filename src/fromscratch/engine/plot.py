"""Training curves of one or several runs, overlaid: loss, learning rate, throughput; and what
every figure of the package needs (`pyplot`, `save_figure`)."""

from pathlib import Path

from fromscratch.engine.metrics import read_csv
from fromscratch.errors import UserError


def pyplot():
    """matplotlib.pyplot, drawing to files (the Agg backend: no display needed). matplotlib is
    optional: without it, a one-line error says how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise UserError("figures need matplotlib: pip install 'fromscratch[plot]'") from error
    return plt


def save_figure(fig, path, dpi: int = 120) -> Path:
    """Write `fig` to `path` (its folder made if missing) and close it; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def plot_runs(run_dirs: list[Path], out_path: Path) -> Path:
    plt = pyplot()
    fig, (ax_loss, ax_lr, ax_speed) = plt.subplots(1, 3, figsize=(15, 4.2))
    for run_dir in map(Path, run_dirs):
        train, evals = read_csv(run_dir / "metrics.csv"), read_csv(run_dir / "eval.csv")
        label = run_dir.name
        steps = [r["step"] for r in train]
        line = ax_loss.plot(steps, [r["loss"] for r in train], lw=0.8, alpha=0.8, label=f"{label} train")[0]
        if evals and "val_loss" in evals[0]:
            ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-",
                         color=line.get_color(), ms=3, label=f"{label} valid")
        ax_lr.plot(steps, [r["lr"] for r in train], color=line.get_color(), label=label)
        ax_speed.plot(steps, [r["tokens_per_sec"] for r in train], color=line.get_color(), lw=0.6, label=label)
    for ax, title in ((ax_loss, "loss"), (ax_lr, "learning rate"), (ax_speed, "tokens / s")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out_path, dpi=110)
