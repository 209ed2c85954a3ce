"""The LiDAR world simulator: geometry is exact, output deterministic, bags read back unchanged."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bevplace_ros.se3 import make_transform, matrix_to_quat_xyzw
from bevplace_ros.sim.lidar import LidarConfig, scan
from bevplace_ros.sim.odometry import OdometryConfig, drifting_odometry
from bevplace_ros.sim.presets import DEMO_ROUTE, preset_config
from bevplace_ros.sim.sequence import SequenceConfig, simulate_sequence
from bevplace_ros.sim.trajectory import TrajectoryConfig, build_trajectory
from bevplace_ros.sim.world import STYLES, WorldConfig, build_world, car_boxes
from bevplace_ros.sim.writers import BagConfig, write_sequence

EXACT = LidarConfig(beams=32, columns=256, range_noise_m=0.0, dropout=0.0, motion_skew=False)


def _small(seed: int = 3, frames: int = 5) -> SequenceConfig:
    """Five sparse keyframes of the demo route: enough for I/O checks, fast to scan."""
    base = preset_config("demo", seed)
    return replace(base, lidar=replace(base.lidar, beams=16, columns=128), max_frames=frames, keyframe_every=10)


def _ray_key(points: np.ndarray) -> np.ndarray:
    """Unique id of the ray (beam, column) that produced each point."""
    column = np.round(points["time"] / EXACT.scan_period_s * EXACT.columns).astype(np.int64)
    return points["ring"].astype(np.int64) * EXACT.columns + column


def _sensor_pose(world, dx: float = 20.0) -> np.ndarray:
    xy = np.array([world.road_x[1] + dx, world.road_y[1] + 2.0])
    return make_transform(np.eye(3), [xy[0], xy[1], world.ground.height(xy[None])[0] + 1.73])


@pytest.mark.parametrize("style", STYLES)
def test_noise_free_hits_lie_on_world_surfaces(style: str) -> None:
    world = build_world(WorldConfig(seed=5, style=style))
    pose = _sensor_pose(world)
    points = scan(world, pose, EXACT, np.random.default_rng(0))
    assert len(points) > 0.5 * EXACT.beams * EXACT.columns
    xyz = np.column_stack([points["x"], points["y"], points["z"]]).astype(float) + pose[:3, 3]
    # float32 storage of points up to 100 m away limits the agreement to ~1e-5 m
    assert world.surface_distance(xyz).max() < 1e-4
    ground = np.abs(xyz[:, 2] - world.ground.height(xyz[:, :2])) < 1e-4
    box = world.boxes.distance(xyz).min(axis=1) < 1e-4
    pole_or_tree = world.frustums.distance(xyz).min(axis=1) < 1e-4
    assert ground.sum() > 100 and box.sum() > 100 and pole_or_tree.sum() > 10
    assert np.all(points["ring"] < EXACT.beams) and np.all((points["intensity"] >= 0) & (points["intensity"] <= 1))


def test_scan_geometry_matches_the_ring_and_range_model() -> None:
    world = build_world(WorldConfig(seed=5))
    points = scan(world, _sensor_pose(world), EXACT, np.random.default_rng(0))
    r = np.linalg.norm(np.column_stack([points["x"], points["y"], points["z"]]), axis=1)
    elevation = np.degrees(np.arcsin(points["z"] / r))
    expected = np.linspace(EXACT.fov_down_deg, EXACT.fov_up_deg, EXACT.beams)[points["ring"]]
    np.testing.assert_allclose(elevation, expected, atol=1e-3)
    assert r.min() >= EXACT.min_range_m and r.max() <= EXACT.max_range_m


def test_noise_and_dropout_follow_the_config() -> None:
    world = build_world(WorldConfig(seed=5))
    pose = _sensor_pose(world)
    exact = scan(world, pose, EXACT, np.random.default_rng(0))
    noisy_cfg = replace(EXACT, range_noise_m=0.05, dropout=0.2)
    noisy = scan(world, pose, noisy_cfg, np.random.default_rng(1))
    assert abs(len(noisy) / len(exact) - 0.8) < 0.03
    common, ia, ib = np.intersect1d(_ray_key(exact), _ray_key(noisy), return_indices=True)
    ra = np.linalg.norm(np.column_stack([exact["x"], exact["y"], exact["z"]])[ia], axis=1)
    rb = np.linalg.norm(np.column_stack([noisy["x"], noisy["y"], noisy["z"]])[ib], axis=1)
    assert abs(np.std(rb - ra) - 0.05) < 0.005 and abs(np.mean(rb - ra)) < 0.005


def test_same_pose_two_passes_differ_only_at_moved_cars() -> None:
    world = build_world(WorldConfig(seed=8))
    pose = _sensor_pose(world)
    ahead = pose[:2, 3] + np.array([[10.0, -3.5], [-12.0, -3.2]])
    cars = car_boxes(np.random.default_rng(2), world.ground, ahead, np.array([np.pi, np.pi]))
    first = scan(world, pose, EXACT, np.random.default_rng(0))
    second = scan(world, pose, EXACT, np.random.default_rng(0), extra=cars)
    a, b = dict(zip(_ray_key(first), first)), dict(zip(_ray_key(second), second))
    changed = [k for k in b if k not in a or tuple(a[k])[:3] != tuple(b[k])[:3]]
    assert 50 < len(changed) < 0.2 * len(b)
    moved = np.array([[b[k]["x"], b[k]["y"], b[k]["z"]] for k in changed], dtype=float) + pose[:3, 3]
    assert cars.distance(moved).min(axis=1).max() < 1e-4  # every difference is a hit on a moved car
    unchanged = [k for k in a if k in b and k not in set(changed)]
    assert len(unchanged) > 0.8 * len(a)


def test_sequence_is_deterministic_and_seed_dependent() -> None:
    a, b, c = (simulate_sequence(_small(seed)) for seed in (3, 3, 4))
    assert a.scan(2).tobytes() == b.scan(2).tobytes()
    assert a.scan(2).tobytes() != c.scan(2).tobytes()
    np.testing.assert_array_equal(a.odom_base(a.stamps), b.odom_base(b.stamps))


def test_demo_route_has_same_and_reverse_revisits() -> None:
    sequence = simulate_sequence(preset_config("demo", 0))
    revisits = [r for r in sequence.revisits() if r.query_end - r.query_start >= 5]
    assert len(revisits) >= 3
    assert {r.direction for r in revisits} == {"same", "reverse"}
    positions = sequence.gt_lidar(sequence.stamps)[:, :3, 3]
    for r in revisits:  # each reported pair really is within 5 m
        d = np.linalg.norm(positions[r.query_start : r.query_end + 1, None] - positions[None, r.match_start : r.match_end + 1], axis=-1)
        assert d.min(axis=1).max() < 5.0


def test_traffic_differs_between_passes_of_the_same_road() -> None:
    sequence = simulate_sequence(preset_config("demo", 0))
    revisit = next(r for r in sequence.revisits() if r.direction == "same" and r.query_end - r.query_start >= 5)
    t_first, t_again = sequence.stamps[revisit.match_start], sequence.stamps[revisit.query_start]
    traffic = sequence.traffic
    live = lambda t: set(np.flatnonzero((traffic.active_from <= t) & (t <= traffic.active_to)))  # noqa: E731
    assert live(t_first) != live(t_again)


def test_odometry_drift_matches_config() -> None:
    world = build_world(WorldConfig(seed=2, blocks_x=4, blocks_y=4))
    trajectory = build_trajectory(world, TrajectoryConfig(length_m=3000.0, seed=2))
    config = OdometryConfig(scale_error=0.02, yaw_drift_deg_per_m=0.01, scale_noise=0.002, yaw_noise_deg_per_sqrt_m=0.003, seed=2)
    odom = drifting_odometry(trajectory, config)
    length = trajectory.s[-1]
    odom_length = np.linalg.norm(np.diff(odom.xy, axis=0), axis=1).sum()
    assert abs(odom_length / length - 1.02) < 4 * 0.002 / np.sqrt(length) + 1e-4
    yaw_error = np.degrees(odom.yaw[-1] - (trajectory.yaw[-1] - trajectory.yaw[0]))
    assert abs(yaw_error - 0.01 * length) < 4 * 0.003 * np.sqrt(length)
    exact = drifting_odometry(trajectory, OdometryConfig(scale_error=0.0, yaw_drift_deg_per_m=0.0, scale_noise=0.0, yaw_noise_deg_per_sqrt_m=0.0))
    c, s = np.cos(trajectory.yaw[0]), np.sin(trajectory.yaw[0])
    true_rel = (trajectory.xy - trajectory.xy[0]) @ np.array([[c, -s], [s, c]])
    np.testing.assert_allclose(exact.xy, true_rel, atol=1e-6)


def _read_bag(path: Path) -> dict[str, list]:
    from rosbags.rosbag2 import Reader
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    out: dict[str, list] = {}
    with Reader(path) as reader:
        for connection, timestamp, raw in reader.messages():
            out.setdefault(connection.topic, []).append((timestamp, store.deserialize_cdr(raw, connection.msgtype)))
    return out


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(folder).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_bag_reads_back_message_by_message(storage: str, tmp_path: Path) -> None:
    sequence = simulate_sequence(_small())
    config = BagConfig(storage=storage)
    write_sequence(sequence, tmp_path / "a" / "bag", None, config)
    write_sequence(simulate_sequence(_small()), tmp_path / "b" / "bag", None, config)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")  # byte-identical for the same seed

    topics = _read_bag(tmp_path / "a" / "bag")
    assert set(topics) == {"/points", "/odom", "/ground_truth", "/tf_static"}
    clouds = topics["/points"]
    assert len(clouds) == len(sequence)
    for index, (timestamp, msg) in enumerate(clouds):
        expected = sequence.scan(index)
        assert msg.header.frame_id == "lidar" and msg.width == len(expected) and msg.point_step == 22
        assert [(f.name, f.offset, f.datatype) for f in msg.fields] == [("x", 0, 7), ("y", 4, 7), ("z", 8, 7), ("intensity", 12, 7), ("ring", 16, 4), ("time", 18, 7)]
        assert msg.data.tobytes() == expected.tobytes()
        assert timestamp == config.start_time_s * 10**9 + round(sequence.stamps[index] * 1e9)
    tf = topics["/tf_static"][0][1].transforms[0]
    assert (tf.header.frame_id, tf.child_frame_id) == ("base_link", "lidar")
    np.testing.assert_allclose([tf.transform.translation.x, tf.transform.translation.z], [0.3, 1.73])

    odom_times = np.array([t for t, _ in topics["/odom"]]) - config.start_time_s * 10**9
    assert np.all(np.diff(odom_times) == 50_000_000)  # 20 Hz
    expected_odom = sequence.odom_base(odom_times / 1e9)
    expected_gt = sequence.T_map_world @ sequence.gt_base(odom_times / 1e9)
    for (_, odom), (_, gt), T_odom, T_gt in zip(topics["/odom"], topics["/ground_truth"], expected_odom, expected_gt):
        assert (odom.header.frame_id, odom.child_frame_id, gt.header.frame_id) == ("odom", "base_link", "map")
        p, q = odom.pose.pose.position, odom.pose.pose.orientation
        np.testing.assert_allclose([p.x, p.y, p.z], T_odom[:3, 3], atol=1e-9)
        assert abs(abs(np.dot([q.x, q.y, q.z, q.w], matrix_to_quat_xyzw(T_odom))) - 1) < 1e-9
        np.testing.assert_allclose([gt.pose.pose.position.x, gt.pose.pose.position.y], T_gt[:2, 3], atol=1e-9)


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_bag_frames_through_the_dataset_reader(storage: str, tmp_path: Path) -> None:
    from bevplace_ros.datasets.frames import open_dataset

    sequence = simulate_sequence(_small())
    write_sequence(sequence, tmp_path / "bag", None, BagConfig(storage=storage))
    frames = list(open_dataset(tmp_path / "bag"))
    assert len(frames) == len(sequence)
    gt = sequence.T_map_world @ sequence.gt_lidar(sequence.stamps)
    odom = sequence.odom_base(sequence.stamps) @ sequence.T_base_lidar
    for frame, T_gt, T_odom in zip(frames, gt, odom):
        points = sequence.scan(frame.index)
        np.testing.assert_array_equal(frame.points, np.column_stack([points["x"], points["y"], points["z"], points["intensity"]]))
        np.testing.assert_allclose(frame.gt_pose, T_gt, atol=1e-9)
        np.testing.assert_allclose(frame.odom_pose, T_odom, atol=1e-9)
    np.testing.assert_allclose(frames[0].gt_pose, np.eye(4), atol=1e-9)


def test_kitti_folder_round_trip(tmp_path: Path) -> None:
    from bevplace_ros.datasets.kitti import read_kitti

    sequence = simulate_sequence(_small())
    write_sequence(sequence, None, tmp_path / "kitti", BagConfig())
    assert sorted(p.name for p in (tmp_path / "kitti" / "velodyne").iterdir()) == [f"{i:06d}.bin" for i in range(len(sequence))]
    frames = list(read_kitti(tmp_path / "kitti"))
    gt = sequence.T_map_world @ sequence.gt_lidar(sequence.stamps)
    for frame in frames:
        points = sequence.scan(frame.index)
        np.testing.assert_array_equal(frame.points[:, 0], points["x"])
        np.testing.assert_allclose(frame.gt_pose, gt[frame.index], atol=1e-9)
        assert frame.stamp == pytest.approx(sequence.stamps[frame.index] - sequence.stamps[0], abs=1e-6)


def test_invalid_configs_name_the_field() -> None:
    with pytest.raises(ValueError, match="LidarConfig.beams"):
        LidarConfig(beams=0)
    with pytest.raises(ValueError, match="WorldConfig.style"):
        WorldConfig(style="desert")
    with pytest.raises(ValueError, match="not a road edge"):
        build_trajectory(build_world(WorldConfig()), TrajectoryConfig(route=((0, 0), (2, 0))))
    with pytest.raises(ValueError, match="U-turn"):
        build_trajectory(build_world(WorldConfig()), TrajectoryConfig(route=((0, 0), (1, 0), (0, 0))))
    with pytest.raises(ValueError, match="BagConfig.storage"):
        BagConfig(storage="ros1")
    assert DEMO_ROUTE[0] == DEMO_ROUTE[-1]  # the demo ends where it began: a closed loop


def test_writers_refuse_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "bag").mkdir()
    with pytest.raises(FileExistsError, match="exists"):
        write_sequence(simulate_sequence(_small(frames=1)), tmp_path / "bag", None)


def test_simulate_command_writes_readable_outputs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    from bevplace_ros.cli import main
    from bevplace_ros.datasets.frames import open_dataset

    args = ["simulate", "--preset", "random", "--seed", "1", "--frames", "3", "--beams", "8", "--columns", "64", "--storage", "mcap", "--kitti", "--out", str(tmp_path)]
    assert main(args) == 0
    assert "simulated 3 frames" in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["frames"] == 3 and summary["outputs"] == {"rosbag2": "rosbag2", "kitti": "kitti"}
    from_bag, from_kitti = list(open_dataset(tmp_path / "rosbag2")), list(open_dataset(tmp_path / "kitti"))
    assert [len(f.points) for f in from_bag] == [len(f.points) for f in from_kitti]
    np.testing.assert_allclose(from_bag[2].gt_pose, from_kitti[2].gt_pose, atol=1e-9)
    with pytest.raises(SystemExit, match="exists; pass --force"):
        main(args)


@pytest.mark.parametrize(("preset", "style"), [("demo", None), ("random", "urban"), ("random", "suburban"), ("random", "industrial")])
def test_ego_vehicle_never_drives_through_objects(preset: str, style: str | None) -> None:
    for seed in (0, 1):
        config = preset_config(preset, seed)
        if style:
            config = replace(config, world=replace(config.world, style=style))
        sequence = simulate_sequence(config)
        base = sequence.gt_base(np.arange(0.0, sequence.trajectory.duration, 0.1))
        body = np.array([[dx, dy, z, 1.0] for dx in (-2.2, 0.0, 2.2) for dy in (-0.9, 0.9) for z in (0.8, 1.7)])  # car box and sensor height
        points = np.einsum("nij,kj->nki", base, body)[..., :3].reshape(-1, 3)
        world = sequence.world
        assert world.boxes.signed_distance(points).min() > 0.0
        f = world.frustums
        rho = np.linalg.norm(points[:, None, :2] - f.center[None], axis=-1)
        z = points[:, 2:3]
        radius_at_z = f.r0 + (f.r1 - f.r0) * (z - f.z0) / (f.z1 - f.z0)
        assert not np.any((z >= f.z0) & (z <= f.z1) & (rho < radius_at_z))
