"""Crash-safe saves: SIGKILL a process that saves every kind of state file in a loop, then load them.

A forked child saves the place map, the registration keyframe store, the pose graph and a
descriptor database over and over (each save replaces the last); the parent kills it after a
random delay and loads each file with the product's own loader. A file is intact when it loads
and holds what was saved. Then corrupt, truncated and foreign files must give the loader's clear
error while the in-memory state stays as it was.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

FILES = ("place_map.npz", "keyframes.npz", "graph.npz", "descriptors.db")


@dataclass(frozen=True)
class CrashSaveConfig:
    kills: int = 50
    max_delay_s: float = 1.0  # kill after a uniform random delay in (0.02, max_delay_s)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kills < 1 or not self.max_delay_s > 0.02:
            raise ValueError(f"need kills >= 1 and max_delay_s > 0.02, got {self.kills}, {self.max_delay_s}")


@dataclass
class CrashSaveReport:
    kills: int = 0
    saves_completed: int = 0  # by all children, so kills really land among saves
    intact_loads: int = 0  # kills after which all four files loaded with the saved content
    tmp_leftovers: int = 0  # orphaned temporary files (never loaded; a killed writer cannot delete them)
    bad_file_errors: dict[str, str] = field(default_factory=dict)  # case -> the loader's message
    state_kept: int = 0  # bad-file loads after which the in-memory state was unchanged
    wall_s: float = 0.0


def build_state(scans: Callable[[int], np.ndarray], overrides: dict[str, Any]) -> dict[str, Any]:
    """A small map of each kind, filled through the real classes."""
    from bevplace_ros.bev import BEVConfig
    from bevplace_ros.descriptor_db import DatabaseConfig, DescriptorDatabase
    from bevplace_ros.keyframe_store import KeyframeStore, KeyframeStoreConfig
    from bevplace_ros.loop_detector import LoopDetectorConfig
    from bevplace_ros.place_map import PlaceMap, PlaceMapConfig
    from bevplace_ros.pose_graph import PoseGraph
    from bevplace_ros.se3 import xyyaw_to_matrix

    rng = np.random.default_rng(0)
    place = PlaceMap(PlaceMapConfig(weights=overrides["place.weights"], device="cpu", rotations=1), BEVConfig(), LoopDetectorConfig())
    store, graph = KeyframeStore(KeyframeStoreConfig()), PoseGraph()
    pose = np.eye(4)
    for key in range(3):
        pose = pose @ xyyaw_to_matrix(4.0, 0.0, 0.05)
        points = scans(key)
        place.add_keyframe(float(key), points, pose)
        store.put(key, points[:, :3])
        graph.add_keyframe(key, float(key), pose)
    database = DescriptorDatabase(DatabaseConfig(dim=256))
    database.add_batch(np.arange(2000), np.arange(2000.0), rng.standard_normal((2000, 256)).astype(np.float32))
    return {"place_map.npz": place, "keyframes.npz": store, "graph.npz": graph, "descriptors.db": database}


def _save_all(state: dict[str, Any], folder: Path) -> None:
    for name in FILES:
        state[name].save(folder / name)


def _saver(state: dict[str, Any], folder: Path, counter) -> None:
    while True:
        _save_all(state, folder)
        with counter.get_lock():
            counter.value += 1


def _wait_first_save(child, counter, before: int, timeout_s: float = 300.0) -> None:
    """Until the child has finished a save, so the kill lands among saves rather than before the first one."""
    deadline = time.monotonic() + timeout_s
    while counter.value == before and child.is_alive():
        if time.monotonic() > deadline:
            raise TimeoutError(f"crash saves: the saving child finished no save in {timeout_s:.0f} s")
        time.sleep(0.002)


def _load_all(state: dict[str, Any], folder: Path) -> bool:
    """True when every file loads with the product's loader and holds what was saved."""
    from bevplace_ros.descriptor_db import DescriptorDatabase
    from bevplace_ros.keyframe_store import KeyframeStore, KeyframeStoreConfig
    from bevplace_ros.pose_graph import PoseGraph

    place = state["place_map.npz"]
    before = place.size
    place.load(folder / "place_map.npz")
    store = KeyframeStore(KeyframeStoreConfig())
    ok = place.size == before and store.load(folder / "keyframes.npz") == len(state["keyframes.npz"])
    graph = PoseGraph.load(folder / "graph.npz")
    database = DescriptorDatabase.load(folder / "descriptors.db")
    return ok and graph.keys == state["graph.npz"].keys and np.array_equal(database.ids, state["descriptors.db"].ids)


def run_crash_saves(cfg: CrashSaveConfig, state: dict[str, Any], folder: Path) -> CrashSaveReport:
    rng = np.random.default_rng(cfg.seed)
    folder.mkdir(parents=True, exist_ok=True)
    _save_all(state, folder)
    report = CrashSaveReport()
    start = time.perf_counter()
    context = multiprocessing.get_context("fork")  # the child inherits the built state; it only writes files
    counter = context.Value("l", 0)
    for _ in range(cfg.kills):
        child = context.Process(target=_saver, args=(state, folder, counter), daemon=True)
        child.start()
        _wait_first_save(child, counter, counter.value)  # on a loaded machine a fork can take longer than the delay
        time.sleep(rng.uniform(0.02, cfg.max_delay_s))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        report.kills += 1
        try:
            report.intact_loads += _load_all(state, folder)
        except (ValueError, RuntimeError):
            pass  # not intact: counted by the difference kills - intact_loads
    report.saves_completed = counter.value
    leftovers = list(folder.glob(".*.tmp"))
    report.tmp_leftovers = len(leftovers)
    for path in leftovers:
        path.unlink()
    _bad_files(state, folder, report)
    report.wall_s = time.perf_counter() - start
    return report


def _bad_files(state: dict[str, Any], folder: Path, report: CrashSaveReport) -> None:
    """Garbage, truncated and foreign files: each loader must refuse with its error and keep its state."""
    from bevplace_ros.descriptor_db import DatabaseError, DescriptorDatabase
    from bevplace_ros.keyframe_store import KeyframeStoreError
    from bevplace_ros.place_map import PlaceMapError
    from bevplace_ros.pose_graph import PoseGraph, PoseGraphError

    place, store = state["place_map.npz"], state["keyframes.npz"]
    sizes = (place.size, len(store))
    good = {name: (folder / name).read_bytes() for name in FILES}
    cases = {"garbage": lambda name: os.urandom(4096), "truncated": lambda name: good[name][: len(good[name]) // 2],
             "foreign": lambda name: good["graph.npz" if name != "graph.npz" else "keyframes.npz"]}
    loaders = {"place_map.npz": (place.load, PlaceMapError), "keyframes.npz": (store.load, KeyframeStoreError),
               "graph.npz": (PoseGraph.load, PoseGraphError), "descriptors.db": (DescriptorDatabase.load, DatabaseError)}
    for case, content in cases.items():
        for name, (load, error) in loaders.items():
            path = folder / f"{case}-{name}"
            path.write_bytes(content(name))
            try:
                load(path)
                report.bad_file_errors[f"{case} {name}"] = "LOADED (not refused)"
            except error as err:
                report.bad_file_errors[f"{case} {name}"] = str(err)
            report.state_kept += (place.size, len(store)) == sizes
