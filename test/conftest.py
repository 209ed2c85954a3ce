"""Shared fixtures: where the provided real data lives, and a seeded RNG."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only KITTI-derived data beside the repo; CI lays it there, so its absence is an error."""
    if not SHARED_DATA.is_dir():
        raise FileNotFoundError(f"expected the provided data at {SHARED_DATA} (../shared/data beside the repo)")
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
