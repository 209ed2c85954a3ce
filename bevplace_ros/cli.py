"""`bevplace-ros`: one thin command line over the core; each subcommand lives in `commands/`.

Command modules define `HELP`, `add_arguments(parser)` and `run(args) -> int`, and import heavy
libraries (torch, faiss, rclpy) inside `run` so that `--help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# (group or None, name, module under bevplace_ros.commands)
COMMANDS: tuple[tuple[str | None, str, str], ...] = (
    (None, "demo", "demo"),
    (None, "replay", "replay"),
    (None, "simulate", "simulate"),
    (None, "embed", "embed"),
    (None, "retrieve", "retrieve"),
    (None, "convert-weights", "convert_weights"),
    (None, "stress", "stress"),
    ("train", "place", "train_place"),
    ("train", "registration", "train_registration"),
    ("evaluate", "place", "evaluate_place"),
    ("evaluate", "registration", "evaluate_registration"),
    ("evaluate", "bev", "evaluate_bev"),
    ("evaluate", "sessions", "evaluate_sessions"),
    ("benchmark", "place", "benchmark_place"),
    ("benchmark", "registration", "benchmark_registration"),
)

GROUP_HELP = {
    "train": "train a network (place recognition or registration)",
    "evaluate": "evaluate with the field's standard metrics",
    "benchmark": "measure per-stage latency and memory; prints a table and writes JSON",
}


def _load(module: str):
    return importlib.import_module(f"bevplace_ros.commands.{module}")


def _available() -> list[tuple[str | None, str, object]]:
    """Commands whose module exists; later issues add the rest."""
    found = []
    for group, name, module in COMMANDS:
        try:
            found.append((group, name, _load(module)))
        except ModuleNotFoundError as err:
            if err.name != f"bevplace_ros.commands.{module}":
                raise
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bevplace-ros", description=__doc__.splitlines()[0])
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for group, name, module in _available():
        if group is None:
            sub = top.add_parser(name, help=module.HELP, description=module.HELP)
        else:
            if group not in groups:
                gp = top.add_parser(group, help=GROUP_HELP[group], description=GROUP_HELP[group])
                groups[group] = gp.add_subparsers(dest="target", required=True, metavar="TARGET")
            sub = groups[group].add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
