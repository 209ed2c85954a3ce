"""`bevplace-ros stress`: malformed input, wrong loops, long runs and crash-safe saves, with figures."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

HELP = "stress the loop-closure stack: fuzzed input, false loops, 10k-keyframe memory, SIGKILL during saves"
PARTS = ("fuzz", "loops", "memory", "saves")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", choices=PARTS, action="append", help="run only this part (repeatable); default: all four")
    parser.add_argument("--small", action="store_true", help="the CI size of each part (about a minute in all)")
    parser.add_argument("--out", type=Path, default=Path("out/stress"), help="folder for stress.json")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from bevplace_ros.atomic_io import atomic_write_bytes

    figures: dict[str, dict] = {}
    for part in args.only or PARTS:
        start = time.perf_counter()
        figures[part] = PART_RUNNERS[part](args.small, args.seed)
        figures[part]["seconds"] = round(time.perf_counter() - start, 1)
        print(format_part(part, figures[part]), flush=True)
    atomic_write_bytes(args.out / "stress.json", json.dumps(figures, indent=2, default=float).encode())
    print(f"figures: {args.out / 'stress.json'}")
    return 0 if all(f["passed"] for f in figures.values()) else 1


def _scans(beams: int = 32):
    """Simulated scans (N, 4) float32 of the repetitive drive, cycled by index."""
    import numpy as np

    from bevplace_ros.stress.repetitive_world import CorridorConfig, corridor_drive

    drive = corridor_drive(CorridorConfig(beams=beams))
    cache: dict[int, np.ndarray] = {}

    def scan(index: int) -> np.ndarray:
        key = index % len(drive)
        if key not in cache:
            xyz = drive.scan(key)
            cache[key] = np.c_[xyz, np.zeros(len(xyz))].astype(np.float32)
        return cache[key]

    return scan


def fuzz_part(small: bool, seed: int) -> dict:
    from bevplace_ros.stress.fuzz_clouds import FuzzConfig, run_fuzz

    cfg = FuzzConfig(bad_messages=120 if small else 1000, huge_clouds=0 if small else 1, seed=seed)  # one 2M cloud takes ~30 s here
    r = run_fuzz(cfg, _scans(), ())
    passed = r.nodes_alive == 3 and r.good_processed == r.good_sent
    return {"passed": passed, "messages_tried": r.tried, "nodes_alive": r.nodes_alive, "good_sent": r.good_sent,
            "good_processed": r.good_processed, "huge_cloud_s": r.huge_seconds, "huge_outcome": r.huge_outcome,
            "skipped": r.skipped, "skip_details": r.skip_details, "per_kind": r.per_kind}


def loops_part(small: bool, seed: int) -> dict:
    from bevplace_ros.stress.false_loops import FalseLoopConfig, run_false_loops

    report, outcomes = run_false_loops(FalseLoopConfig(true_candidates=5 if small else 30, seed=seed), {"use_network": False})
    change = report.ate_change()
    passed = report.graph["full pipeline"]["false_loops"] == 0 or abs(change) <= 0.05
    return {"passed": passed, **asdict(report), "ate_change": change,
            "second_check_rejections": [o.second_check for o in outcomes if o.registered and o.second_check]}


def memory_part(small: bool, seed: int) -> dict:
    from bevplace_ros.stress.long_run import LongRunConfig, run_long

    full = LongRunConfig(seed=seed)
    cfg = replace(full, keyframes=1000, max_database=200, bev_in_memory=100, clouds_in_memory=50, clouds_on_disk=150) if small else full
    scan = _scans(beams=16)
    r = run_long(cfg, lambda k: scan(k)[:, :3])
    slope, growth = r.slope(cfg.warmup_share)
    graph_kib = r.graph_kib_per_keyframe(cfg.warmup_share)
    within = (r.database_max <= cfg.max_database and r.bev_in_memory_max <= cfg.bev_in_memory
              and r.clouds_in_memory_max <= cfg.clouds_in_memory and r.clouds_on_disk_max <= cfg.clouds_on_disk)
    graph_ok = r.graph_keyframes == r.keyframes and graph_kib <= cfg.graph_kib_per_keyframe
    return {"passed": within and abs(growth) <= 0.10 and graph_ok, "keyframes": r.keyframes, "peak_rss_mib": r.peak_rss_mib,
            "rss_slope_mib_per_1000_keyframes": slope, "rss_growth_after_warmup": growth, "bounds_respected": within,
            "graph_keyframes": r.graph_keyframes, "graph_peak_rss_mib": max(m for _, m in r.graph_samples),
            "graph_kib_per_keyframe": graph_kib, "graph_samples": r.graph_samples,
            "database_max": r.database_max, "bev_in_memory_max": r.bev_in_memory_max, "clouds_in_memory_max": r.clouds_in_memory_max,
            "clouds_on_disk_max": r.clouds_on_disk_max, "config": asdict(cfg), "samples": r.samples}


def saves_part(small: bool, seed: int) -> dict:
    from bevplace_ros.stress.crash_saves import CrashSaveConfig, build_state, run_crash_saves

    state = build_state(_scans(), {"place.weights": "random"})
    with tempfile.TemporaryDirectory(prefix="bevplace-crash-") as folder:
        r = run_crash_saves(CrashSaveConfig(kills=10 if small else 50, max_delay_s=0.5, seed=seed), state, Path(folder))
    refused = all(not msg.startswith("LOADED") for msg in r.bad_file_errors.values())
    passed = r.intact_loads == r.kills and refused and r.state_kept == len(r.bad_file_errors)
    return {"passed": passed, **asdict(r)}


PART_RUNNERS = {"fuzz": fuzz_part, "loops": loops_part, "memory": memory_part, "saves": saves_part}


def format_part(part: str, f: dict) -> str:
    status = "PASS" if f["passed"] else "FAIL"
    if part == "fuzz":
        return (f"[{status}] fuzz: {f['messages_tried']} bad messages tried, {f['nodes_alive']}/3 nodes alive, "
                f"{f['good_processed']}/{f['good_sent']} good scans processed; 2M-point cloud: "
                f"{', '.join(f'{s:.2f} s' for s in f['huge_cloud_s'])} ({', '.join(f['huge_outcome'])}) [{f['seconds']} s]")
    if part == "loops":
        g = f["graph"]
        rows = "\n".join(f"    {name:38s} false loops {v['false_loops']:3d}  true loops {v['true_loops']:3d}  ATE {v['ate_m']:.3f} m"
                         for name, v in g.items())
        return (f"[{status}] loops: {f['false_injected']} false candidates injected among {f['false_injected'] + f['true_candidates']} "
                f"({f['keyframes']} keyframes); passing registration alone {f['false_passing_registration']}, registration + "
                f"second check {f['false_passing_both_checks']}; ATE odometry {f['ate_odometry_m']:.2f} m, change vs clean "
                f"{f['ate_change']:+.1%} [{f['seconds']} s]\n{rows}")
    if part == "memory":
        return (f"[{status}] memory: {f['keyframes']} keyframes, bounded state: peak RSS {f['peak_rss_mib']:.0f} MiB, slope after "
                f"warm-up {f['rss_slope_mib_per_1000_keyframes']:+.2f} MiB/1000 keyframes ({f['rss_growth_after_warmup']:+.1%}), "
                f"bounds respected: {f['bounds_respected']}; pose-graph process: {f['graph_keyframes']} keyframes, peak RSS "
                f"{f['graph_peak_rss_mib']:.0f} MiB, {f['graph_kib_per_keyframe']:.1f} KiB/keyframe [{f['seconds']} s]")
    return (f"[{status}] saves: {f['kills']} SIGKILLs during {f['saves_completed']} completed save rounds, "
            f"{f['intact_loads']}/{f['kills']} intact loads, {f['tmp_leftovers']} orphaned .tmp files; bad files refused "
            f"{sum(not m.startswith('LOADED') for m in f['bad_file_errors'].values())}/{len(f['bad_file_errors'])}, "
            f"state kept {f['state_kept']}/{len(f['bad_file_errors'])} [{f['seconds']} s]")
