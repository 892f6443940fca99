"""The ``vmamba`` command line: each area of the library contributes its own subcommands."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that define ``register(subparsers)``; each subcommand sets ``func(args) -> int``.
COMMAND_MODULES = (
    "vmamba.train.commands",  # train, eval, predict
    "vmamba.tools.commands",  # convert, export
    "vmamba.analysis.commands",  # bench, flops, erf, attn, ablate
)


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmamba", description="VMamba models: train, evaluate, convert, analyse.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("models", help="list the registered models").set_defaults(func=_list_models)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if not name.startswith(exc.name or "\0"):  # a real missing dependency inside the module
                raise
            continue
        module.register(sub)
    return parser


def _list_models(args: argparse.Namespace) -> int:
    from . import list_models

    print("\n".join(list_models()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except (CommandError, ValueError, FileNotFoundError) as exc:
        print(f"vmamba {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
