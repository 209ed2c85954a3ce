"""`bevplace-ros demo`: the main job on the bundled simulator sequence."""

from __future__ import annotations

import argparse
from pathlib import Path

from bevplace_ros.commands.replay import add_replay_options, replay_and_report

HELP = "replay the bundled simulator sequence (data/demo) through the three nodes and report loops, latency and ATE"
DEMO_BAG = Path(__file__).resolve().parents[2] / "data" / "demo" / "rosbag2"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bag", type=Path, default=DEMO_BAG, help="the demo bag (made by scripts/setup.sh)")
    add_replay_options(parser)
    parser.set_defaults(out=Path("out/demo"))


def run(args: argparse.Namespace) -> int:
    if not args.bag.exists():
        raise SystemExit(f"{args.bag} is missing: run `bash scripts/setup.sh` (it generates the demo sequence) "
                         "or `bevplace-ros simulate --preset demo --out data/demo`")
    return replay_and_report(args.bag, args)
