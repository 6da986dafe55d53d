"""The ``lmcache`` command: one sub-command per module in ``lmcache/commands/``.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("demo", "info", "calibrate")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lmcache`` console script; returns the exit status."""
    parser = argparse.ArgumentParser(prog="lmcache", description="Small, fast and durable KV caches.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"lmcache.commands.{name}")
        except ImportError:  # a command whose module is absent from this build
            continue
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        modules[name] = mod
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
