"""`bevplace-ros benchmark registration`: per-stage latency of the registrar on real KITTI scans; table + JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from bevplace_ros.device import DEVICE_CHOICES

HELP = "per-stage registration latency (ms per pair) and parameter count; prints a table, writes JSON"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("out/registration/benchmark.json"))
    parser.add_argument("--weights", default=None, help="RoITr-lite weights (default: the shipped file)")
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kitti", type=Path, default=None,
                        help="folder with KITTI scans 000000/000005/000015.bin; default: those sweeps of a simulated 64-beam drive")


def _stats(values: list[float]) -> dict[str, float]:
    import numpy as np

    return {"median": float(np.median(values)), "p90": float(np.percentile(values, 90))}


def run(args: argparse.Namespace) -> int:
    import json
    import os

    import torch

    from bevplace_ros.atomic_io import atomic_write_bytes
    from bevplace_ros.commands.benchmark_place import SIM_SCAN_NAME, simulated_kitti_scans
    from bevplace_ros.datasets.kitti import read_kitti_scan
    from bevplace_ros.registration import Registrar, RegistrationConfig
    from bevplace_ros.registration.model import count_parameters

    frames = (0, 5, 15)
    if args.kitti is None:
        scans, source = simulated_kitti_scans(frames), f"{SIM_SCAN_NAME}, sweeps {frames}"
    else:
        scans, source = [read_kitti_scan(args.kitti / f"{i:06d}.bin") for i in frames], f"{args.kitti}, scans {frames}"
    print(f"scans: {source}")
    report: dict = {"scans": source, "device": args.device, "torch_threads": args.threads, "cpu_count": os.cpu_count()}
    for name, use_network in (("roitr_lite", True), ("fpfh_ransac", False)):
        cfg = RegistrationConfig(use_network=use_network, classical_fallback=False, device=args.device,
                                 torch_threads=args.threads, **({"weights": args.weights} if args.weights else {}))
        registrar = Registrar(cfg)
        stages: dict[str, list[float]] = {}
        for rep in range(args.repeats + 1):  # the first round warms caches and is dropped
            clouds = [registrar.preprocess(s) for s in scans]
            if registrar.device.type == "cuda":
                torch.cuda.synchronize()
            for a, b in ((0, 1), (0, 2), (1, 2)):
                res = registrar.register_prepared(clouds[a], clouds[b])
                if rep == 0:
                    continue
                for key, value in res.timings.items():
                    stages.setdefault(key, []).append(value)
                for key in ("voxel_normals", "keypoints", "features"):
                    stages.setdefault(f"per_cloud_{key}", []).append(clouds[a].timings[key])
        entry = {key: _stats(values) for key, values in stages.items()}
        per_cloud = sum(entry[f"per_cloud_{k}"]["median"] for k in ("voxel_normals", "keypoints", "features"))
        entry["pair_with_new_query_ms"] = per_cloud + entry["total"]["median"]
        entry["parameters"] = count_parameters(registrar.model) if registrar.model is not None else 0
        entry["device"] = str(registrar.device)
        report[name] = entry
    lines = [f"{'stage (median ms)':28} {'roitr_lite':>11} {'fpfh_ransac':>12}"]
    keys = [k for k in report["roitr_lite"] if isinstance(report["roitr_lite"][k], dict)]
    for key in keys:
        other = report["fpfh_ransac"].get(key, {}).get("median", float("nan"))
        lines.append(f"{key:28} {report['roitr_lite'][key]['median']:11.1f} {other:12.1f}")
    for key in ("pair_with_new_query_ms", "parameters"):
        lines.append(f"{key:28} {report['roitr_lite'][key]:11.1f} {report['fpfh_ransac'][key]:12.1f}")
    print("\n".join(lines))
    print(f"device {report['roitr_lite']['device']}, torch threads {args.threads}; 'total' = register_prepared on "
          "cached clouds; pair_with_new_query = total + preparing one new cloud")
    atomic_write_bytes(args.out, json.dumps(report, indent=1).encode())
    print(f"wrote {args.out}")
    return 0
