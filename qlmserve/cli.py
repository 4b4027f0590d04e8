"""`qlm`: the one entry point. Each feature module adds its own subcommands through a
`register(subparsers)` function listed in SUBCOMMAND_MODULES."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that each define `register(subparsers) -> None`; every subcommand parser they
# add sets `func=callable(args) -> int`.
SUBCOMMAND_MODULES = [
    "qlmserve.controller.cli",
    "qlmserve.controller.top",
    "qlmserve.backends.cli",
    "qlmserve.demo",
    "qlmserve.backends.hf.cli",
    "qlmserve.bench.scheduling",
    "qlmserve.bench.submit",
    "qlmserve.bench.http",
    "qlmserve.bench.depth",
    "qlmserve.bench.solver",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlm", description="QLM: SLO-aware queue management for LLM serving")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
