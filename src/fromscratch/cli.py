"""The `fromscratch` command: one sub-command per model and verb.

    fromscratch translate train|eval|run   the Transformer, English → Indonesian
    fromscratch llama train|generate|convert
    fromscratch plot RUN_DIR [RUN_DIR ...]
    fromscratch demo                       the main job on built-in data

Each package contributes its sub-commands through a `register(subparsers)` function in the
module named in `COMMANDS`; adding a model is a new package and one line there.

A mistake the user can fix (`UserError`) is printed as one line, without a traceback, and the
command exits with status 2. A run stopped by SIGINT or SIGTERM saves, then exits with 130 or
143, as a shell reports a command killed by that signal.
"""

import argparse
import importlib
import sys

from fromscratch.errors import Interrupted, UserError

COMMANDS = (
    "fromscratch.transformer.cli",
    "fromscratch.llama.cli",
    "fromscratch.moe.cli",
    "fromscratch.vlm.cli",
    "fromscratch.engine.cli",
    "fromscratch.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fromscratch", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        importlib.import_module(module).register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"fromscratch: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"fromscratch: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("fromscratch: interrupted", file=sys.stderr)
        return 130
    return 0
