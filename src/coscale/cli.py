"""The ``coscale`` command line: a thin front end over the Python API.

Each command group lives beside the library code it drives and registers itself here through a
``register(subparsers)`` function that adds its parser and sets ``func`` (a callable taking the parsed
arguments and returning an exit code). Errors a user can fix (:class:`coscale.errors.CoscaleError`)
print as one line on stderr and exit with status 2. When the reader of stdout goes away
(``coscale info | head -1``) the command ends quietly with status 141, as a tool killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from coscale.errors import CoscaleError

# The shell's status for a process ended by SIGPIPE (128 + 13). Python ignores SIGPIPE and raises
# BrokenPipeError instead; exiting with the status a C tool would get keeps `set -o pipefail` honest.
BROKEN_PIPE_STATUS = 141

# Modules with a register(subparsers) function, in the order their commands are listed.
COMMAND_MODULES = (
    "coscale.train.commands",  # train, info
    "coscale.infer.commands",  # generate
    "coscale.serve.commands",  # serve, bench-serve, tokenize
    "coscale.analysis.commands",  # analyze, report
    "coscale.calibrate",  # calibrate
)


def build_parser() -> argparse.ArgumentParser:
    from coscale import __version__

    parser = argparse.ArgumentParser(
        prog="coscale",
        description="Train, serve and analyse DeepSeek-V3-style models (MLA, DeepSeekMoE, MTP, FP8).",
    )
    parser.add_argument("--version", action="version", version=f"coscale {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that command group is not part of this build
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return run(argv)
        finally:
            sys.stdout.flush()  # a closed pipe surfaces here rather than at interpreter exit
    except BrokenPipeError:
        # Python's recipe (docs: signal, "Note on SIGPIPE"): point stdout at devnull so the final flush
        # at exit writes nowhere, and end without a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return BROKEN_PIPE_STATUS


def run(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command; user errors become one line on stderr and status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except CoscaleError as e:
        print(f"coscale {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"coscale {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
