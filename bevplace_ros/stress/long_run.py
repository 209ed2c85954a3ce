"""Long runs: drive the per-keyframe state of all three nodes for many keyframes and sample RSS.

What is driven (no network: its cost is per keyframe, not per map size): the place node's
DescriptorDatabase (add + top-k query of a synthetic unit descriptor of the real dimension), its
BEV-image KeyframeStore (drop policy); the registration node's cloud KeyframeStore (spill policy,
low-resolution simulated scans). These are bounded, so their process's RSS must be flat.

The pose graph node's PoseGraph (one odometry edge per keyframe) runs in a child process, as it
does when launched: the graph is the map and grows by design, so its RSS is reported per keyframe
and checked against a bound of its own instead of being hidden in the flat-RSS figure.
RSS is VmRSS from /proc/<pid>/status.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from bevplace_ros.se3 import xyyaw_to_matrix


@dataclass(frozen=True)
class LongRunConfig:
    keyframes: int = 10_000
    descriptor_dim: int = 8192  # BEVPlace NetVLAD output (64 clusters x 128)
    max_database: int = 2000  # descriptor database bound (place.max_keyframes)
    bev_in_memory: int = 500  # BEV images kept (place.bev_in_memory); older ones dropped
    bev_size: int = 75  # pixels: 30 m range at 0.4 m
    clouds_in_memory: int = 300  # registration store.max_in_memory; older ones spill to disk
    clouds_on_disk: int = 1000  # store.max_on_disk; older spilled ones are deleted
    sample_every: int = 100
    warmup_share: float = 0.3  # RSS slope is fitted after this share of the run (bounds reached by then)
    graph_kib_per_keyframe: float = 16.0  # accepted pose-graph growth (measured ~7 KiB: gtsam factor, value, clique)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.keyframes < 10 * self.sample_every or not 0 < self.warmup_share < 0.9:
            raise ValueError(f"need keyframes >= 10 x sample_every and warmup_share in (0, 0.9); got {self.keyframes}, {self.warmup_share}")
        warm = self.keyframes * self.warmup_share
        if warm < max(self.max_database, self.bev_in_memory, self.clouds_in_memory + self.clouds_on_disk):
            raise ValueError("the warm-up must reach every configured bound: raise keyframes or lower the bounds")


@dataclass
class LongRunReport:
    keyframes: int = 0
    samples: list[tuple[int, float]] = field(default_factory=list)  # (keyframe, RSS MiB) of the bounded state
    graph_samples: list[tuple[int, float]] = field(default_factory=list)  # (keyframe, RSS MiB) of the pose-graph process
    database_max: int = 0
    bev_in_memory_max: int = 0
    clouds_in_memory_max: int = 0
    clouds_on_disk_max: int = 0
    graph_keyframes: int = 0
    wall_s: float = 0.0

    @property
    def peak_rss_mib(self) -> float:
        return max(rss for _, rss in self.samples)

    def slope(self, warmup_share: float) -> tuple[float, float]:
        """Bounded state: (MiB per 1000 keyframes after warm-up, fitted growth over that span / RSS at warm-up)."""
        return _fit(self.samples, self.keyframes * warmup_share)

    def graph_kib_per_keyframe(self, warmup_share: float) -> float:
        return _fit(self.graph_samples, self.keyframes * warmup_share)[0] * 1024 / 1000


def _fit(samples: list[tuple[int, float]], start: float) -> tuple[float, float]:
    k, rss = np.array([s for s in samples if s[0] >= start]).T
    per_kf, intercept = np.polyfit(k, rss, 1)
    return float(per_kf * 1000), float(per_kf * (k[-1] - k[0]) / (intercept + per_kf * k[0]))


def rss_mib(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def _graph_process(connection) -> None:
    """Child: add each batch of (key, stamp, pose) to a PoseGraph, answer with its size and RSS."""
    from bevplace_ros.pose_graph import PoseGraph

    graph = PoseGraph()
    while (batch := connection.recv()) is not None:
        for key, stamp, pose in batch:
            graph.add_keyframe(key, stamp, pose)
        connection.send((len(graph.keys), rss_mib()))
    connection.close()


def run_long(cfg: LongRunConfig, scans: Callable[[int], np.ndarray]) -> LongRunReport:
    from bevplace_ros.descriptor_db import DatabaseConfig, DescriptorDatabase
    from bevplace_ros.keyframe_store import KeyframeStore, KeyframeStoreConfig

    rng = np.random.default_rng(cfg.seed)
    database = DescriptorDatabase(DatabaseConfig(dim=cfg.descriptor_dim, max_size=cfg.max_database))
    bevs = KeyframeStore(KeyframeStoreConfig(max_in_memory=cfg.bev_in_memory))
    report = LongRunReport(keyframes=cfg.keyframes)
    start = time.perf_counter()
    ours, theirs = multiprocessing.get_context("spawn").Pipe()
    child = multiprocessing.get_context("spawn").Process(target=_graph_process, args=(theirs,), name="pose-graph", daemon=True)
    child.start()
    poses: list[tuple[int, float, np.ndarray]] = []
    with tempfile.TemporaryDirectory(prefix="bevplace-long-run-") as spill:
        clouds = KeyframeStore(KeyframeStoreConfig(max_in_memory=cfg.clouds_in_memory, spill_dir=spill, max_on_disk=cfg.clouds_on_disk))
        pose = np.eye(4)
        for key in range(cfg.keyframes):
            descriptor = rng.standard_normal(cfg.descriptor_dim).astype(np.float32)
            database.query(descriptor, float(key), k=1, exclude_recent=50)
            database.add(key, float(key), descriptor)
            bevs.put(key, rng.integers(0, 255, (cfg.bev_size, cfg.bev_size), dtype=np.uint8))
            clouds.put(key, scans(key))
            pose = pose @ xyyaw_to_matrix(4.0, 0.0, float(rng.normal(0, 0.02)))
            poses.append((key, float(key), pose))
            report.database_max = max(report.database_max, len(database))
            report.bev_in_memory_max = max(report.bev_in_memory_max, bevs.in_memory)
            report.clouds_in_memory_max = max(report.clouds_in_memory_max, clouds.in_memory)
            report.clouds_on_disk_max = max(report.clouds_on_disk_max, len(clouds) - clouds.in_memory)
            if (key + 1) % cfg.sample_every == 0:
                report.samples.append((key + 1, rss_mib()))
                ours.send(poses)
                poses = []
                report.graph_keyframes, graph_rss = ours.recv()
                report.graph_samples.append((key + 1, graph_rss))
        clouds.close()
    if poses:
        ours.send(poses)
        report.graph_keyframes = ours.recv()[0]
    ours.send(None)
    child.join(timeout=30.0)
    report.wall_s = time.perf_counter() - start
    return report
