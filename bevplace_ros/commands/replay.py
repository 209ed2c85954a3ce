"""`bevplace-ros replay BAG`: the main job on a rosbag2 of your own."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REVISIT_RADIUS_M = 5.0  # a keyframe revisits a place within this distance (BEVPlace protocol)
REVISIT_MIN_GAP = 50  # keyframes; matches the default retrieval.exclude_recent
HELP = "replay a rosbag2 (sqlite3/mcap) through the three nodes, record their outputs and report loops, latency and ATE"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bag", type=Path, help="rosbag2 folder with PointCloud2 and nav_msgs/Odometry")
    add_replay_options(parser)


def add_replay_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=Path, default=None, help="ROS parameters YAML (default: config/bevplace.yaml)")
    parser.add_argument("--out", type=Path, default=Path("out/replay"), help="folder for this run's report, plot and recorded outputs")
    parser.add_argument("--rate", type=float, default=0.0, help="multiple of real time; 0 = lock-step, as fast as the pipeline allows")
    parser.add_argument("--points-topic", default="/points")
    parser.add_argument("--odom-topic", default="/odom")
    nodes = parser.add_mutually_exclusive_group()
    nodes.add_argument("--external", action="store_true", help="only publish and record: the nodes run as separate processes")
    nodes.add_argument("--processes", action="store_true",
                       help="start the three nodes as separate processes, as the launch file does, and report each one's CPU, "
                            "memory and /diagnostics; with --rate 1 the real-time check (scan-to-loop latency, drops)")
    parser.add_argument("--max-scans", type=int, default=0, help="stop after this many scans (0 = all)")
    parser.add_argument("--skip-scans", type=int, default=0, help="start after this many scans")
    parser.add_argument("--load-map", type=Path, default=None, help="folder saved by --save-map: continue that map")
    parser.add_argument("--save-map", type=Path, default=None, help="save every node's state into this folder at the end")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="NAME:=VALUE", help="override a node parameter")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--domain-id", type=int, default=None,
                        help="ROS domain of the replay (default: in-process or --processes, one private to this run; --external, ROS_DOMAIN_ID)")


def run(args: argparse.Namespace) -> int:
    return replay_and_report(args.bag, args)


def replay_and_report(bag: Path, args: argparse.Namespace) -> int:
    from bevplace_ros.atomic_io import atomic_write_bytes
    from bevplace_ros.evaluation.loop_report import format_realtime, format_report, plot_run
    from bevplace_ros.nodes.bag_replay import ReplayOptions, replay, replay_domain
    from bevplace_ros.nodes.config_file import default_params_file

    run_dir = args.out / time.strftime("run-%Y%m%d-%H%M%S")
    options = ReplayOptions(
        bag=bag, params_file=args.params or default_params_file(), record=run_dir / "outputs", rate=args.rate,
        points_topic=args.points_topic, odom_topic=args.odom_topic, in_process=not (args.external or args.processes),
        processes=args.processes, node_logs=run_dir / "node_logs",
        settle_s=5.0 if args.processes else 15.0,  # with processes the nodes' /diagnostics also say when they are done
        max_scans=args.max_scans, skip_scans=args.skip_scans, load_map=args.load_map, save_map=args.save_map,
        overrides=tuple(args.param), progress=not args.no_progress, domain_id=args.domain_id,
    )
    domain = replay_domain(options)
    print(f"ROS domain: {'ROS_DOMAIN_ID of the environment' if domain is None else domain}"
          f"{' (private to this replay; --domain-id to choose)' if domain is not None and args.domain_id is None else ''}")
    result = replay(options)
    summary, gt, outcomes = summarize_run(options, result)
    atomic_write_bytes(run_dir / "report.json", json.dumps(summary, indent=2).encode())
    plot_run(run_dir / "trajectories.png", gt, result.odometry, result.optimized, outcomes)
    print(format_report(summary))
    if "realtime" in summary:
        print("\n" + format_realtime(summary["realtime"]))
    print(f"report: {run_dir / 'report.json'}\nplot:   {run_dir / 'trajectories.png'}\noutputs: {options.record}")
    if len(set(result.sessions.values())) > 1:  # a loaded map: every session in the map frame, inter-session loops
        from bevplace_ros.evaluation.sessions import plot_sessions, session_lines

        plot_sessions(run_dir / "sessions.png", result.sessions, result.map_poses, result.graph_loops or set())
        print("\n".join(session_lines(result.sessions, result.anchorings)) + f"\nsessions: {run_dir / 'sessions.png'}")
    return 0


def summarize_run(options, result) -> tuple[dict, dict, list]:
    """(summary, ground truth by keyframe, loop outcomes) of a finished replay."""
    from bevplace_ros.evaluation.loop_report import (
        judge_loops,
        realtime_summary,
        revisiting_keyframes,
        summarize,
    )

    gt = _ground_truth(options.bag, result.keyframe_stamps, options.points_topic, options.odom_topic)
    outcomes = judge_loops([c[:4] for c in result.closures], gt)
    revisits = revisiting_keyframes(gt, REVISIT_RADIUS_M, REVISIT_MIN_GAP) if gt else []
    summary = summarize(outcomes, revisits, result.odometry, result.optimized, gt, result.graph_loops)
    summary.update(scans=result.scans_published, keyframes=len(result.keyframe_stamps), wall_s=result.wall_s,
                   latency_ms=result.latency_ms or {"registration": [c[4] for c in result.closures]},
                   bag=str(options.bag), outputs=str(options.record))
    if options.rate > 0:
        summary["realtime"] = realtime_summary(result, options.rate)
    return summary, gt, outcomes


def _ground_truth(bag: Path, keyframe_stamps: dict[int, int], points_topic: str, odom_topic: str) -> dict:
    """Keyframe id -> T_map_sensor from the bag's ground truth (topic or side file); {} when it has none."""
    from bevplace_ros.datasets.rosbag2 import read_rosbag2

    by_ms = {round(ns * 1e-6): key for key, ns in keyframe_stamps.items()}
    gt = {}
    for frame in read_rosbag2(bag, points_topic=points_topic, odom_topic=odom_topic):
        key = by_ms.get(round(frame.stamp * 1e3))
        if key is not None and frame.gt_pose is not None:
            gt[key] = frame.gt_pose
    return gt
