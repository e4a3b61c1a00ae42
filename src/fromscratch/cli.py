"""The `fromscratch` command: one sub-command per model and verb.

    fromscratch translate train|eval|run   the Transformer, English → Indonesian
    fromscratch llama train|generate|convert
    fromscratch plot RUN_DIR [RUN_DIR ...]
    fromscratch demo                       the main job on built-in data

A mistake the user can fix (`UserError`) is printed as one line, without a traceback, and the
command exits with status 2.
"""

import argparse
import sys

from fromscratch.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from fromscratch.llama.cli import add_llama_commands
    from fromscratch.transformer.train import add_translate_commands

    parser = argparse.ArgumentParser(prog="fromscratch", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_translate_commands(commands)
    add_llama_commands(commands)

    plot = commands.add_parser("plot", help="draw loss, learning-rate and throughput curves of runs")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    plot.add_argument("--out", default="runs.png", help="PNG to write (default: runs.png)")
    plot.set_defaults(func=run_plot)

    demo = commands.add_parser("demo", help="train and evaluate every model on built-in data (a few minutes)")
    demo.add_argument("--out", default="runs/demo", help="where the demo's runs go")
    demo.set_defaults(func=run_demo)
    return parser


def run_plot(args) -> None:
    from pathlib import Path

    from fromscratch.engine.plot import plot_runs

    for run_dir in args.run_dirs:
        if not (Path(run_dir) / "metrics.csv").exists():
            raise UserError(f"{run_dir} is not a run directory (no metrics.csv)")
    print(f"wrote {plot_runs(args.run_dirs, args.out)}")


def run_demo(args) -> None:
    from fromscratch.demo import main as demo_main

    demo_main(args.out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"fromscratch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fromscratch: interrupted", file=sys.stderr)
        return 130
    return 0
