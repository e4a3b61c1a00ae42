"""`fromscratch plot`: the engine's sub-command, for runs of any model."""

from pathlib import Path

from fromscratch.errors import UserError
from fromscratch.inputs import checked_output


def register(commands) -> None:
    plot = commands.add_parser("plot", help="draw loss, learning-rate and throughput curves of runs")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    plot.add_argument("--out", default="runs.png", help="PNG to write (default: runs.png)")
    plot.set_defaults(func=plot_command)


def plot_command(args) -> None:
    from fromscratch.engine.plot import plot_runs

    for run_dir in args.run_dirs:
        if not (Path(run_dir) / "metrics.csv").exists():
            raise UserError(f"{run_dir} is not a run directory (no metrics.csv)")
    print(f"wrote {plot_runs(args.run_dirs, checked_output(args.out, '--out', '.png'))}")
