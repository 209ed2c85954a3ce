"""Shared fixtures: where the provided real data lives, a seeded RNG, a simulated drive as a rosbag2 and its replay."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
# `.ci/run` sets this where ../shared/data is laid out: a missing folder then fails the real-data tests
# instead of skipping them, so CI cannot pass without running them.
REQUIRE_SHARED_ENV = "BEVPLACE_REQUIRE_SHARED"
SHARED_FOLDERS = ("kitti_scans", "kitti_scans_more", "kitti_bev/00", "kitti_bev/06", "bevplace_weights")  # what the real-data tests read


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only KITTI-derived data beside the repo (../shared/data); a user's clone has none, so skip."""
    missing = [str(SHARED_DATA / f) for f in SHARED_FOLDERS if not (SHARED_DATA / f).is_dir()]
    if missing:
        what = str(SHARED_DATA) if not SHARED_DATA.is_dir() else ", ".join(missing)
        reason = f"needs the KITTI-derived data: {what} is missing (../shared/data beside the repository; README: tests)"
        if os.environ.get(REQUIRE_SHARED_ENV) == "1":
            pytest.fail(f"{reason}, and {REQUIRE_SHARED_ENV}=1 requires it")
        pytest.skip(reason)
    return SHARED_DATA


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# Each test session talks on its own DDS domain, so parallel runs on one machine never cross.
os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))


@pytest.fixture()
def ros_context():
    """A fresh rclpy context; the real middleware (Fast DDS) underneath."""
    import rclpy
    from rclpy.context import Context

    context = Context()
    rclpy.init(context=context)
    try:
        yield context
    finally:
        context.try_shutdown()



@pytest.fixture(scope="module")
def torch_one_thread():
    """Two OpenMP threads on two cores shared with other jobs run ~3x slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# One lap of a block and its first edge again: a same-direction revisit ~60 keyframes later.
LAP_AND_EDGE = ((0, 0), (1, 0), (1, 1), (0, 1), (0, 0), (1, 0))
PARAMS_FILE = REPO_ROOT / "config" / "bevplace.yaml"


@pytest.fixture(scope="session")
def drive(tmp_path_factory) -> Path:
    """A short simulated drive written as a real rosbag2 (sqlite3) by the simulator."""
    from bevplace_ros.sim.presets import preset_config, with_overrides
    from bevplace_ros.sim.sequence import simulate_sequence
    from bevplace_ros.sim.writers import BagConfig, write_sequence

    config = with_overrides(preset_config("demo", seed=3), **{"trajectory.route": LAP_AND_EDGE, "world.blocks_x": 1})
    bag = tmp_path_factory.mktemp("drive") / "rosbag2"
    write_sequence(simulate_sequence(config), bag, None, BagConfig())
    return bag


def replay_options(bag: Path, tmp: Path, **changes):
    """Lock-step in-process replay of `bag` with the shipped parameters, recording into `tmp`/outputs."""
    from dataclasses import replace

    from bevplace_ros.nodes.bag_replay import ReplayOptions

    return replace(ReplayOptions(bag=bag, params_file=PARAMS_FILE, record=tmp / "outputs", progress=False), **changes)


@pytest.fixture(scope="session")
def drive_replay(drive, tmp_path_factory):
    """(options, run) of one full lock-step replay of `drive`; shared so each end-to-end check costs no extra replay."""
    from bevplace_ros.nodes.bag_replay import replay

    options = replay_options(drive, tmp_path_factory.mktemp("drive_replay"))
    return options, replay(options)
