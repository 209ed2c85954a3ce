"""Named simulator set-ups: the small demo drive and seeded random drives for training and tests."""

from __future__ import annotations

from dataclasses import replace

from bevplace_ros.sim.lidar import LidarConfig
from bevplace_ros.sim.odometry import OdometryConfig
from bevplace_ros.sim.sequence import SequenceConfig
from bevplace_ros.sim.trajectory import TrajectoryConfig
from bevplace_ros.sim.world import WorldConfig

PRESETS = ("demo", "random", "drive_10hz")

# Two suburban blocks side by side: a lap of the left block, the first edge again (same direction,
# maybe another lane), a lap of the right block whose last edge runs back down the shared road
# (reverse direction), then the first edge reversed. No U-turns.
DEMO_ROUTE = ((0, 0), (1, 0), (1, 1), (0, 1), (0, 0), (1, 0), (2, 0), (2, 1), (1, 1), (1, 0), (0, 0))


def preset_config(name: str, seed: int = 0) -> SequenceConfig:
    """The preset's SequenceConfig with every random stream derived from `seed`."""
    if name == "demo":
        # 32 x 360 rays and a keyframe every 4 m (every 4th 10 Hz sweep at 10 m/s) keep the bag
        # under 30 MB with ~135 frames; lanes 1.25-2.25 m right of the centre keep reverse-direction
        # revisits (other side of the road) within the 5 m place criterion.
        return SequenceConfig(
            world=WorldConfig(seed=seed, style="suburban", blocks_x=2, blocks_y=1),
            lidar=LidarConfig(beams=32, columns=360, max_range_m=80.0),
            trajectory=TrajectoryConfig(route=DEMO_ROUTE, speed_mps=10.0, lane_offsets_m=(1.25, 2.25), seed=seed),
            odometry=OdometryConfig(seed=seed),
            keyframe_every=4,
            seed=seed,
        )
    if name == "drive_10hz":
        # What a car with a 64-beam LiDAR records: every 10 Hz sweep of an HDL-64E-like sensor
        # (+2..-24.8 deg, 2048 columns: ~120k points, 2.7 MB a cloud) over a seeded ~2.1 km random walk
        # at 10 m/s through 3 x 3 suburban blocks, which revisits roads in both directions.
        return SequenceConfig(
            world=WorldConfig(seed=seed, style="suburban", blocks_x=3, blocks_y=3, ground_float32=True),
            lidar=LidarConfig(beams=64, columns=2048, fov_up_deg=2.0, fov_down_deg=-24.8, max_range_m=120.0),
            trajectory=TrajectoryConfig(length_m=2100.0, speed_mps=10.0, lane_offsets_m=(1.25, 2.25), seed=seed),
            odometry=OdometryConfig(seed=seed),
            keyframe_every=1,
            seed=seed,
        )
    if name == "random":
        return SequenceConfig(
            world=WorldConfig(seed=seed),
            trajectory=TrajectoryConfig(seed=seed),
            odometry=OdometryConfig(seed=seed),
            seed=seed,
        )
    raise ValueError(f"unknown simulator preset {name!r}; choose one of {PRESETS}")


def with_overrides(config: SequenceConfig, **changes) -> SequenceConfig:
    """Apply command-line overrides ('world.style', 'lidar.beams', 'max_frames' ...) to a preset."""
    parts: dict[str, dict] = {}
    top = {}
    for key, value in changes.items():
        if value is None:
            continue
        if "." in key:
            part, name = key.split(".", 1)
            parts.setdefault(part, {})[name] = value
        else:
            top[key] = value
    for part, values in parts.items():
        top[part] = replace(getattr(config, part), **values)
    return replace(config, **top)
