"""`bevplace-ros benchmark place`: per-stage latency and memory of place recognition on one scan."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

HELP = "latency of decode, BEV, descriptor (1 and R rotations; the BEVPlace v1 network and keyframe), database query; peak RSS; bytes per keyframe"
# Without --scan: KITTI-like scans the simulator makes (HDL-64E geometry: 64 beams, +2..-24.8 deg, ~117k points,
# a 10 Hz sweep every 1 m along the demo drive).
SIM_SCAN_OVERRIDES = {"lidar.beams": 64, "lidar.columns": 2000, "lidar.fov_up_deg": 2.0, "lidar.fov_down_deg": -24.8,
                      "lidar.max_range_m": 120.0, "keyframe_every": 1}
SIM_SCAN_NAME = "simulated 64-beam scan (demo world, seed 0)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scan", type=Path, default=None,
                        help="KITTI .bin scan (float32 x, y, z, intensity); default: a simulated 64-beam scan of the demo world")
    parser.add_argument("--out", type=Path, default=Path("out/benchmark_place.json"))
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per stage; the median is reported (shared CPU)")
    parser.add_argument("--rotations", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--db-sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--db-dims", type=int, nargs="+", default=[256, 8192], help="256 = a PCA-projected descriptor, 8192 = raw NetVLAD")
    parser.add_argument("--db-max-gib", type=float, default=1.0, help="skip database sizes whose vectors exceed this")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--device", default="auto")


def _median_ms(fn, repeats: int) -> dict:
    import time

    import numpy as np

    fn()  # warm-up: allocator, oneDNN primitive cache
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    ms = np.array(times) * 1e3
    # CPU time of all threads: on a shared machine the figure that load inflates least
    return {"median_ms": float(np.median(ms)), "min_ms": float(ms.min()), "max_ms": float(ms.max()), "cpu_median_ms": float(np.median(cpu) * 1e3)}


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def simulated_kitti_scans(frames: tuple[int, ...]) -> list[np.ndarray]:
    """(N, 4) float32 x, y, z, intensity of these sweeps of a KITTI-like simulated drive: data the package makes."""
    import numpy as np

    from bevplace_ros.sim.presets import preset_config, with_overrides
    from bevplace_ros.sim.sequence import simulate_sequence

    sequence = simulate_sequence(with_overrides(preset_config("demo"), max_frames=max(frames) + 1, **SIM_SCAN_OVERRIDES))
    return [np.stack([p[n] for n in ("x", "y", "z", "intensity")], axis=1) for p in map(sequence.scan, frames)]


def _load_scan(path: Path | None) -> tuple[np.ndarray, str]:
    """(N, 4) x, y, z, intensity and what it is: the given KITTI scan, or one the simulator makes."""
    if path is None:
        return simulated_kitti_scans((0,))[0], f"{SIM_SCAN_NAME}, first sweep"
    from bevplace_ros.datasets.kitti import read_kitti_scan

    return read_kitti_scan(path), str(path)


def _decode_stage(raw: np.ndarray, repeats: int) -> tuple[dict, np.ndarray]:
    """Time the PointCloud2 decode the nodes run, on a message holding the scan."""
    from types import SimpleNamespace

    import numpy as np

    from bevplace_ros.pointcloud2 import pack_points, read_points_numpy

    structured = np.rec.fromarrays(raw.T, names="x,y,z,intensity")
    fields, data, step = pack_points(structured)
    cloud = SimpleNamespace(header=None, height=1, width=len(raw), fields=fields, is_bigendian=False, point_step=step, row_step=step * len(raw), data=data, is_dense=False)
    timing = _median_ms(lambda: read_points_numpy(cloud, ("x", "y", "z"), skip_nans=True), repeats)
    timing["what"] = "pointcloud2.read_points_numpy(x,y,z, skip_nans) of a PointCloud2 holding the scan"
    return timing, read_points_numpy(cloud, ("x", "y", "z"), skip_nans=True)


def _deskew_stage(points, repeats: int) -> dict:
    """Time the keyframe deskew: a 10 Hz sweep (times from the azimuth) at 10 m/s and 90 deg/s."""
    import numpy as np

    from bevplace_ros.deskew import deskew

    offsets = 0.1 * (np.arctan2(points[:, 1], points[:, 0]) + np.pi) / (2 * np.pi)
    twist = np.array([0.0, 0.0, np.radians(90.0), 10.0, 0.0, 0.0])
    timing = _median_ms(lambda: deskew(points, offsets, twist), repeats)
    timing["what"] = "deskew.deskew of the scan: 0.1 s sweep, 10 m/s, 90 deg/s"
    return timing


def _network_stages(image, rotations: list[int], device, repeats: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bevplace_ros.models.bevplace_net import BEVPlaceNetConfig, build_seeded_model

    x = torch.from_numpy(image)[None, None].to(device)
    out = {}
    for r in rotations:
        eager = build_seeded_model(BEVPlaceNetConfig(rotations=r)).to(device)
        fast = eager.for_inference().to(device)
        with FlopCounterMode(display=False) as counter:
            with torch.inference_mode():
                fast(x)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        row = {"gflop": counter.get_total_flops() / 1e9}
        with torch.inference_mode():
            row["eager_no_grad"] = _median_ms(lambda: (eager(x), sync()), repeats)
            row["inference"] = _median_ms(lambda: (fast(x), sync()), repeats)
        row["gflops_achieved"] = row["gflop"] / (row["inference"]["median_ms"] / 1e3)
        out[f"descriptor_r{r}"] = row
    return out


def _v1_stages(image, device, repeats: int) -> dict:
    """The BEVPlace authors' network (shipped converted weights): the bare network, eager and
    inference copy, and a whole keyframe as the node makes it (descriptor + local features + keypoints)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bevplace_ros.models.checkpoint import DEFAULT_V1_WEIGHTS, V1, load_checkpoint
    from bevplace_ros.place_recognizer import PlaceRecognizer, PlaceRecognizerConfig

    x = torch.from_numpy(image)[None, None].to(device)
    eager = load_checkpoint(DEFAULT_V1_WEIGHTS).to(device)
    fast = eager.for_inference().to(device)
    recognizer = PlaceRecognizer(PlaceRecognizerConfig(model=V1, device=str(device)))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with FlopCounterMode(display=False) as counter:
        with torch.inference_mode():
            fast(x)
    row = {"gflop": counter.get_total_flops() / 1e9}
    with torch.inference_mode():
        row["eager_no_grad"] = _median_ms(lambda: (eager(x), sync()), repeats)
        row["inference"] = _median_ms(lambda: (fast(x), sync()), repeats)
    row["keyframe"] = _median_ms(lambda: recognizer.describe_images(image[None]), repeats)
    row["gflops_achieved"] = row["gflop"] / (row["inference"]["median_ms"] / 1e3)
    row["peak_rss_mib_so_far"] = _peak_rss_mib()
    return row


def _keyframe_stages(points, device: str, repeats: int) -> dict:
    """A whole keyframe through the loop detector with the default model and retrieval settings
    (BEV, one network pass, retrieval, re-ranking with a BEV pose per candidate against its stored
    keypoints), into a map with no candidate and into one whose 3 earlier keyframes all are.
    Each timed keyframe goes into a fresh map, so every repeat sees the same candidates."""
    import time

    import numpy as np

    from bevplace_ros.bev_pose import estimate_pose
    from bevplace_ros.descriptor_db import DatabaseConfig, DescriptorDatabase
    from bevplace_ros.keyframe_store import KeyframeStore, KeyframeStoreConfig
    from bevplace_ros.loop_detector import LoopDetector, LoopDetectorConfig
    from bevplace_ros.place_recognizer import PlaceRecognizer, PlaceRecognizerConfig
    from bevplace_ros.se3 import invert, transform_points, xyyaw_to_matrix

    recognizer = PlaceRecognizer(PlaceRecognizerConfig(device=device))
    earlier = [transform_points(invert(xyyaw_to_matrix(x, y, yaw)), points) for x, y, yaw in ((1.0, 0.5, 0.2), (-2.0, 1.0, 1.5), (3.0, -1.0, -2.5))]
    out = {"model": recognizer.cfg.model}
    for candidates in (0, 3):
        times, found = [], []
        for _ in range(repeats + 1):  # the first one warms up
            cfg = LoopDetectorConfig(exclude_recent=0, exclude_seconds=0.0, max_descriptor_distance=2.0)
            detector = LoopDetector(cfg, recognizer, DescriptorDatabase(DatabaseConfig(dim=recognizer.descriptor_dim)), KeyframeStore(KeyframeStoreConfig()))
            for i, scan in enumerate(earlier[:candidates]):
                detector.add_keyframe(float(i), scan, np.eye(4))
            start = time.perf_counter()
            found.append(len(detector.add_keyframe(100.0, points, np.eye(4)).candidates))
            times.append(time.perf_counter() - start)
        ms = np.array(times[1:]) * 1e3
        out[f"keyframe_{candidates}_candidates"] = {"median_ms": float(np.median(ms)), "min_ms": float(ms.min()), "max_ms": float(ms.max()),
                                                   "candidates": int(found[-1])}
    stored = [detector.stored_keypoints(k) for k in range(3)]
    query = recognizer.describe(points).keypoints
    it = iter(range(10**9))
    out["pose_vs_stored_keypoints"] = _median_ms(lambda: estimate_pose(stored[next(it) % 3], query, recognizer.cfg.pose), repeats)
    out["bytes_per_keyframe"] = detector.keypoints.memory_bytes() / len(detector.keypoints)
    return out


def _synthetic_descriptors(n: int, dim: int, rng) -> np.ndarray:
    """Places visited along a trajectory: each keyframe near one of n/10 place centres, so
    near neighbours exist as in a real map (uniform random vectors would make HNSW look bad)."""
    import numpy as np

    centres = rng.standard_normal((max(n // 10, 1), dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _database_stages(sizes: list[int], dims: list[int], max_gib: float, repeats: int) -> list[dict]:
    import time

    import numpy as np

    from bevplace_ros.descriptor_db import DatabaseConfig, DescriptorDatabase

    rng = np.random.default_rng(0)
    rows = []
    for dim in dims:
        for n in sizes:
            if n * dim * 4 > max_gib * 2**30:
                rows.append({"dim": dim, "size": n, "skipped": f"vectors need {n * dim * 4 / 2**30:.1f} GiB > --db-max-gib"})
                continue
            x = _synthetic_descriptors(n, dim, rng)
            queries = x[rng.integers(0, n, 200)] + 0.3 * rng.standard_normal((200, dim)).astype(np.float32) / np.sqrt(dim) * 4
            row = {"dim": dim, "size": n}
            results = {}
            for kind, cfg in (("exact", DatabaseConfig(dim=dim, exact_max_size=n, max_size=2 * n)), ("hnsw", DatabaseConfig(dim=dim, exact_max_size=1, max_size=2 * n))):
                db = DescriptorDatabase(cfg)
                start = time.perf_counter()
                db.add_batch(np.arange(n), np.arange(n, dtype=float), x)
                build_s = time.perf_counter() - start
                it = iter(range(10**9))
                timing = _median_ms(lambda: db.query(queries[next(it) % len(queries)], stamp=-1e9, k=1, exclude_recent=10), repeats * 4)
                results[kind] = [db.query(q, stamp=-1e9, k=1, exclude_recent=10)[0].keyframe_id for q in queries]
                row[kind] = {"query": timing, "build_s": build_s, "bytes_per_keyframe": db.stored_bytes() / n}
            row["hnsw_recall_at_1_vs_exact"] = float(np.mean(np.array(results["exact"]) == np.array(results["hnsw"])))
            rows.append(row)
    return rows


def _print_table(report: dict) -> None:
    print(f"{'stage':44s} {'median ms':>10s} {'min ms':>8s}  (BEVPlace v1: CPU ms of all threads, median)")
    for name in ("decode", "deskew", "bev"):
        print(f"{name:44s} {report[name]['median_ms']:10.2f} {report[name]['min_ms']:8.2f}")
    for name, row in report["network"].items():
        for kind in ("eager_no_grad", "inference"):
            print(f"{name + ' ' + kind:44s} {row[kind]['median_ms']:10.2f} {row[kind]['min_ms']:8.2f}")
        print(f"{name + ' GFLOP / achieved GFLOP/s':44s} {row['gflop']:10.2f} {row['gflops_achieved']:8.1f}")
    v1 = report["bevplace_v1"]
    for kind in ("eager_no_grad", "inference", "keyframe"):
        print(f"{'bevplace_v1 ' + kind:44s} {v1[kind]['median_ms']:10.2f} {v1[kind]['min_ms']:8.2f}  CPU {v1[kind]['cpu_median_ms']:.1f}")
    print(f"{'bevplace_v1 GFLOP / achieved GFLOP/s':44s} {v1['gflop']:10.2f} {v1['gflops_achieved']:8.1f}")
    print(f"{'keypoints + BEV pose (pair)':44s} {report['pose']['median_ms']:10.2f} {report['pose']['min_ms']:8.2f}")
    kf = report["keyframe"]
    for n in (0, 3):
        row = kf[f"keyframe_{n}_candidates"]
        print(f"{f'keyframe with {n} candidates':44s} {row['median_ms']:10.2f} {row['min_ms']:8.2f}  {kf['model']}, BEV to re-ranked candidates")
    print(f"{'BEV pose vs stored keypoints (per candidate)':44s} {kf['pose_vs_stored_keypoints']['median_ms']:10.2f} "
          f"{kf['pose_vs_stored_keypoints']['min_ms']:8.2f}  {kf['bytes_per_keyframe'] / 1e3:.1f} kB stored per keyframe")
    for row in report["database"]:
        label = f"query dim={row['dim']} n={row['size']}"
        if "skipped" in row:
            print(f"{label:44s} skipped: {row['skipped']}")
            continue
        for kind in ("exact", "hnsw"):
            q = row[kind]
            print(f"{label + ' ' + kind:44s} {q['query']['median_ms']:10.3f} {q['query']['min_ms']:8.3f}  build {q['build_s']:.1f} s, {q['bytes_per_keyframe']:.0f} B/keyframe")
        print(f"{label + ' HNSW recall@1 vs exact':44s} {row['hnsw_recall_at_1_vs_exact']:10.3f}")
    print(f"peak RSS {report['peak_rss_mib']:.0f} MiB; torch threads {report['torch_threads']}; device {report['device']}")


def run(args: argparse.Namespace) -> int:
    import json
    import os

    import numpy as np
    import torch

    from bevplace_ros.atomic_io import atomic_write_bytes
    from bevplace_ros.bev import BEVConfig, make_bev
    from bevplace_ros.bev_pose import BEVPoseConfig, estimate_pose, extract_keypoints
    from bevplace_ros.device import resolve_device
    from bevplace_ros.models.bevplace_net import build_seeded_model
    from bevplace_ros.se3 import invert, transform_points, xyyaw_to_matrix

    if args.scan is not None and not args.scan.is_file():
        print(f"scan not found: {args.scan}")
        return 2
    raw, scan_name = _load_scan(args.scan)
    print(f"scan: {scan_name}, {len(raw)} points")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    report: dict = {"scan": scan_name, "torch_threads": torch.get_num_threads(), "device": str(device), "cpu_count": os.cpu_count()}
    report["decode"], points = _decode_stage(raw, args.repeats)
    report["points"] = int(len(points))
    report["deskew"] = _deskew_stage(points, args.repeats)
    bev_cfg = BEVConfig()
    report["bev"] = _median_ms(lambda: make_bev(points, bev_cfg), args.repeats)
    image = make_bev(points, bev_cfg)
    report["network"] = _network_stages(image, args.rotations, device, args.repeats)
    report["bevplace_v1"] = _v1_stages(image, device, args.repeats)
    model = build_seeded_model().for_inference()
    other = make_bev(transform_points(invert(xyyaw_to_matrix(2.0, -1.0, 0.3)), points), bev_cfg)
    with torch.inference_mode():
        local_a, local_b = (loc.numpy() for loc in model(torch.from_numpy(np.stack([image, other]))[:, None])[0])
    pose_cfg = BEVPoseConfig()
    report["pose"] = _median_ms(
        lambda: estimate_pose(extract_keypoints(image, local_a, bev_cfg, pose_cfg), extract_keypoints(other, local_b, bev_cfg, pose_cfg), pose_cfg), args.repeats
    )
    report["keyframe"] = _keyframe_stages(points, args.device, args.repeats)
    report["database"] = _database_stages(args.db_sizes, args.db_dims, args.db_max_gib, args.repeats)
    report["peak_rss_mib"] = _peak_rss_mib()
    _print_table(report)
    atomic_write_bytes(args.out, json.dumps(report, indent=2).encode())
    print(f"wrote {args.out}")
    return 0
