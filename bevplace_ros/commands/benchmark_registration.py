"""`bevplace-ros benchmark registration`: per-keyframe and warm-cache per-candidate latency of each method; table + JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from bevplace_ros.commands.evaluate_registration import add_kiss_retry_argument
from bevplace_ros.device import DEVICE_CHOICES

HELP = "per-keyframe and warm-cache per-candidate registration latency per method; prints a table, writes JSON"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("out/registration/benchmark.json"))
    parser.add_argument("--weights", default=None, help="RoITr-lite weights (default: the shipped file)")
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kitti", type=Path, default=None,
                        help="folder with KITTI scans 000000/000005/000015.bin; default: those sweeps of a simulated 64-beam drive")
    add_kiss_retry_argument(parser)
    parser.add_argument("--other-place", type=Path, default=None,
                        help="a KITTI scan of another place (e.g. kitti_scans_more/000198.bin): candidates against it are "
                             "rejected, which costs more than accepting; default with --kitti: none, else a far sweep of the drive")


FAR_SWEEP = 60  # a sweep of the simulated drive far from sweeps 0-15


def _stats(values: list[float]) -> dict[str, float]:
    import numpy as np

    return {"median": float(np.median(values)), "p90": float(np.percentile(values, 90))}


def _method(name: str, scans: list, args: argparse.Namespace) -> dict:
    """Per-stage times through the node's LoopVerifier: each keyframe prepared once, then every candidate warm; a
    fourth scan, if given, is another place, and its candidates are timed apart (they fail every try)."""
    import time

    import torch

    from bevplace_ros.keyframe_store import KeyframeStoreConfig
    from bevplace_ros.loop_verifier import LoopVerifier, LoopVerifierConfig
    from bevplace_ros.registration import RegistrationConfig
    from bevplace_ros.registration.model import count_parameters
    from bevplace_ros.registration.registrar import KISS_RETRIES, method_options

    cfg = RegistrationConfig(classical_fallback=False, device=args.device, torch_threads=args.threads,
                             kiss_retry=KISS_RETRIES[args.kiss_retry],
                             **method_options(name), **({"weights": args.weights} if args.weights else {}))
    stages: dict[str, list[float]] = {}
    for rep in range(args.repeats + 1):  # the first round warms library caches and is dropped
        verifier = LoopVerifier(LoopVerifierConfig(), cfg, KeyframeStoreConfig())
        for key, scan in enumerate(scans):
            verifier.add_keyframe(key, scan)
        for key in range(len(scans)):  # what the node pays once per keyframe
            cloud = verifier.prepare(key)
            if rep:
                for stage, ms in cloud.timings.items():
                    stages.setdefault(f"per_keyframe_{stage}", []).append(ms)
        wrong = [(3, match) for match in range(3)] if len(scans) > 3 else []
        for query, match in ((1, 0), (2, 0), (2, 1), *wrong):  # candidates on a warm cache
            start = time.perf_counter()
            res = verifier.verify(query, match)
            if verifier.registrar.device.type == "cuda":
                torch.cuda.synchronize()
            if rep and query == 3:
                stages.setdefault("per_rejected_candidate_warm", []).append((time.perf_counter() - start) * 1e3)
                rejected = stages.setdefault("rejected_candidates_verified", [])
                rejected.append(float(res.verified))
            elif rep:
                stages.setdefault("per_candidate_warm", []).append((time.perf_counter() - start) * 1e3)
                for stage, ms in res.timings.items():
                    stages.setdefault(stage, []).append(ms)
    entry: dict = {key: _stats(values) for key, values in stages.items()}
    clouds, size = verifier.prepared_cache_bytes()
    entry["prepared_cloud_mib"] = size / clouds / 2**20
    entry["cache_bound_keyframes"] = int(verifier.cfg.prepared_cache_mib * 2**20 // (size / clouds))
    entry["parameters"] = count_parameters(verifier.registrar.model) if verifier.registrar.model is not None else 0
    entry["device"] = str(verifier.registrar.device)
    return entry


def run(args: argparse.Namespace) -> int:
    import json
    import os

    from bevplace_ros.atomic_io import atomic_write_bytes
    from bevplace_ros.commands.benchmark_place import SIM_SCAN_NAME, simulated_kitti_scans
    from bevplace_ros.datasets.kitti import read_kitti_scan
    from bevplace_ros.registration.registrar import METHODS

    frames = (0, 5, 15)
    if args.kitti is None:
        scans, source = simulated_kitti_scans((*frames, FAR_SWEEP)), f"{SIM_SCAN_NAME}, sweeps {frames}, another place {FAR_SWEEP}"
    else:
        scans, source = [read_kitti_scan(args.kitti / f"{i:06d}.bin") for i in frames], f"{args.kitti}, scans {frames}"
        if args.other_place is not None:
            scans.append(read_kitti_scan(args.other_place))
            source += f", another place {args.other_place}"
    print(f"scans: {source}")
    report: dict = {"scans": source, "device": args.device, "torch_threads": args.threads, "cpu_count": os.cpu_count(),
                    "kiss_retry": args.kiss_retry}
    for name in METHODS:
        report[name] = _method(name, scans, args)
    keys = list(dict.fromkeys(k for name in METHODS for k, v in report[name].items() if isinstance(v, dict)))
    lines = [f"{'stage (median ms)':30}" + "".join(f"{name:>14}" for name in METHODS)]
    for key in keys:
        lines.append(f"{key:30}" + "".join(f"{report[n].get(key, {}).get('median', float('nan')):14.1f}" for n in METHODS))
    for key in ("prepared_cloud_mib", "cache_bound_keyframes", "parameters"):
        lines.append(f"{key:30}" + "".join(f"{report[n][key]:14.1f}" for n in METHODS))
    print("\n".join(lines))
    print(f"device {report['network']['device']}, torch threads {args.threads}; per_keyframe_* = paid once per keyframe "
          "(cached, bounded by verifier.prepared_cache_mib); per_candidate_warm = LoopVerifier.verify with both clouds "
          "cached (registration + second check); the other rows are its stages; per_rejected_candidate_warm = the same "
          "for candidates of another place (rejected_candidates_verified: the share that passed, 0 if right)")
    atomic_write_bytes(args.out, json.dumps(report, indent=1).encode())
    print(f"wrote {args.out}")
    return 0
