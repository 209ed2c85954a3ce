"""`bevplace-ros evaluate sessions`: relocalisation of new runs against a saved map on the simulator."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = ("map a simulated world in one run, then replay runs starting at random places in it against the saved map: "
        "relocalisation rate, distance/time before relocalising, false anchorings, ATE in the map frame; prints a table, writes JSON")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sessions", type=int, default=10, help="runs replayed against the map")
    parser.add_argument("--length-m", type=float, default=160.0, help="length of each run's random walk [m]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", type=Path, default=None, help="ROS parameters YAML (default: config/bevplace.yaml)")
    parser.add_argument("--out", type=Path, default=Path("out/sessions"), help="bags (kept for reruns), map, plots and sessions.json")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from bevplace_ros.evaluation.sessions import SessionsConfig, evaluate_sessions, format_table
    from bevplace_ros.nodes.config_file import default_params_file

    if args.sessions < 1 or args.length_m < 10:
        raise SystemExit("--sessions must be >= 1 and --length-m >= 10")
    cfg = SessionsConfig(seed=args.seed, sessions=args.sessions, session_length_m=args.length_m)
    report = evaluate_sessions(cfg, args.out, args.params or default_params_file(), progress=not args.no_progress)
    print(f"map: {report['map_keyframes']} keyframes, its own ATE in the map frame (no alignment) {report['map_ate_m']:.2f} m")
    print(format_table(report["runs"], report["summary"]))
    print(f"report: {args.out / 'sessions.json'}; one plot per run: {args.out}/runNN.png")
    return 0
