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
    parser.add_argument("--kitti", type=Path, nargs="+", default=None, metavar="BEV_FOLDER",
                        help="instead: the query frames of KITTI BEV sequences (00, 06: BEVPlace's split) as a second run against their database frames")


def run(args: argparse.Namespace) -> int:
    from bevplace_ros.evaluation.sessions import SessionsConfig, evaluate_sessions, format_table
    from bevplace_ros.nodes.config_file import default_params_file

    if args.kitti:
        return _kitti(args)
    if args.sessions < 1 or args.length_m < 10:
        raise SystemExit("--sessions must be >= 1 and --length-m >= 10")
    cfg = SessionsConfig(seed=args.seed, sessions=args.sessions, session_length_m=args.length_m)
    report = evaluate_sessions(cfg, args.out, args.params or default_params_file(), progress=not args.no_progress)
    print(f"map: {report['map_keyframes']} keyframes, its own ATE in the map frame (no alignment) {report['map_ate_m']:.2f} m")
    print(format_table(report["runs"], report["summary"]))
    print(f"report: {args.out / 'sessions.json'}; one plot per run: {args.out}/runNN.png")
    return 0


def _kitti(args: argparse.Namespace) -> int:
    import json

    from bevplace_ros.atomic_io import atomic_write_bytes
    from bevplace_ros.commands.evaluate_place import KITTI_SPLITS
    from bevplace_ros.evaluation.sessions import KittiSessionsConfig, kitti_sessions

    results = {}
    for folder in args.kitti:
        if folder.name not in KITTI_SPLITS:
            raise SystemExit(f"{folder}: not a KITTI sequence with a known split ({sorted(KITTI_SPLITS)})")
        _, db_end, query_start = KITTI_SPLITS[folder.name]
        results[folder.name] = result = kitti_sessions(folder, KittiSessionsConfig(db_end=db_end, query_start=query_start))
        print(f"KITTI {folder.name}: map {result['frames']['map']} frames, run {result['frames']['run']}; "
              f"BEV-pose loops {result['loops']} ({result['false_loops']} false)")
        for n, r in result["by_anchor_loops"].items():
            line = f"  anchor after {n} loop(s): false loops taken {r['false_loops_in_graph']}, "
            if r["anchored"]:
                line += (f"anchored after {r['distance_before_m']:.1f} m ({r['frames_before']} keyframes), anchor error "
                         f"{r['anchor_error_m']:.2f} m / {r['anchor_error_deg']:.2f} deg ({'FALSE' if r['false_anchoring'] else 'true'}), "
                         f"ATE anchor only {r['ate_anchor_only_m']:.2f} m -> joined {r['ate_joined_m']:.2f} m")
            else:
                line += "never anchored"
            print(line)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / "kitti_sessions.json", json.dumps(results, indent=2).encode())
    print(f"report: {args.out / 'kitti_sessions.json'}")
    return 0
