"""Reject scans that cannot describe a place before they reach the descriptor database.

A degenerate scan (a blinded or covered sensor, a driver emitting zeros, a cloud outside the BEV's
height band) still yields a normal-looking unit descriptor, and once stored it matches anything
as badly as everything; so it is refused with a named reason instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bevplace_ros.bev import BEVConfig, make_bev


@dataclass(frozen=True)
class ScanCheckConfig:
    """Defaults pass sparse real scans: a 16-beam sweep of a street has hundreds of occupied BEV cells."""

    min_points: int = 500  # finite points within max_range
    min_radius: float = 2.0  # [m] the farthest point must be at least this far from the sensor (horizontally)
    min_bev_cells: int = 50  # occupied cells of the BEV image the network sees

    def __post_init__(self) -> None:
        if self.min_points < 1 or self.min_radius < 0 or self.min_bev_cells < 0:
            raise ValueError("scan checks need min_points >= 1, min_radius >= 0 [m] and min_bev_cells >= 0")


@dataclass(frozen=True)
class ScanRejection:
    reason: str  # short and stable: a counter name and the key of its throttled warning
    detail: str


def check_scan(points: np.ndarray, cfg: ScanCheckConfig, bev: BEVConfig) -> ScanRejection | None:
    """None when the (N, >=3) sensor-frame `points` (finite, within max_range) can describe a place."""
    return check_points(points, cfg) or check_bev(make_bev(points, bev), cfg, bev)


def check_points(points: np.ndarray, cfg: ScanCheckConfig) -> ScanRejection | None:
    """The checks that need no BEV image (the place node runs them on every scan it decodes)."""
    if len(points) < cfg.min_points:
        return ScanRejection("too few points", f"{len(points)} finite points within max_range, min_points={cfg.min_points}")
    radius = float(np.sqrt(np.max(np.einsum("ij,ij->i", points[:, :2], points[:, :2]))))
    if radius < cfg.min_radius:
        return ScanRejection("all near sensor", f"every point lies within {radius:.3f} m of the sensor, min_radius={cfg.min_radius} m "
                             "(blinded or covered sensor, or a driver emitting zeros?)")
    return None


def check_bev(image: np.ndarray, cfg: ScanCheckConfig, bev: BEVConfig) -> ScanRejection | None:
    """The check on the BEV image itself, run where the image is made anyway (the place node: keyframes only)."""
    cells = int(np.count_nonzero(image))
    if cells < cfg.min_bev_cells:
        return ScanRejection("sparse bev", f"{cells} occupied BEV cells within {bev.range_m} m and z in [{bev.z_min}, {bev.z_max}) m, "
                             f"min_bev_cells={cfg.min_bev_cells} (check the mount height against bev.z_min / bev.z_max)")
    return None
