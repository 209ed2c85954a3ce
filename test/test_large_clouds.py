"""LiDAR-size clouds reach the place node in another process over the package's default set-up.

With Fast DDS's defaults (512 KiB shared-memory segment, UDP fallback) most 2 MB clouds are lost
between processes; `python -m bevplace_ros.nodes.cloud_delivery` measures both set-ups.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import REPO_ROOT
from bevplace_ros.nodes.cloud_delivery import run_delivery
from bevplace_ros.nodes.runtime import DDS_SETTINGS, large_cloud_profile


def _package_env() -> dict[str, str]:
    """What `. install/env.sh` gives a shell without DDS settings of its own (README commands, CI)."""
    clean = {k: v for k, v in os.environ.items() if k not in DDS_SETTINGS}
    out = subprocess.run(["bash", "-c", f". '{REPO_ROOT}/install/env.sh' && env -0"], env=clean, capture_output=True, check=True).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


@pytest.mark.slow
def test_64_beam_clouds_at_10_hz_reach_a_node_in_another_process():
    env = _package_env()
    assert env.get("FASTDDS_DEFAULT_PROFILES_FILE") == str(large_cloud_profile())
    result, log = run_delivery(env, scans=100, rate_hz=10.0, beams=64)
    assert result.cloud_bytes >= 2_000_000
    assert result.processed >= 99 and result.lost == 0, (result, log[-3000:])
