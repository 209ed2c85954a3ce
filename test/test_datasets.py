"""Data-set readers: real KITTI scans, hand-written rosbag2 files and the kind dispatcher."""

from __future__ import annotations

import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bevplace_ros.datasets.frames import DatasetError, Frame, dataset_kind, open_dataset
from bevplace_ros.datasets.kitti import read_kitti
from bevplace_ros.datasets.rosbag2 import read_rosbag2
from bevplace_ros.pointcloud2 import FLOAT32, FieldSpec
from bevplace_ros.se3 import load_kitti_poses, matrix_to_quat_xyzw, xyyaw_to_matrix
from bevplace_ros.sim.presets import preset_config
from bevplace_ros.sim.sequence import simulate_sequence
from bevplace_ros.sim.writers import BagConfig, write_sequence


def test_real_kitti_scans(shared_data: Path) -> None:
    frames = list(open_dataset(shared_data / "kitti_scans"))
    assert [f.index for f in frames] == [0, 5, 15]
    assert [f.stamp for f in frames] == pytest.approx([0.0, 0.5, 1.5])
    poses = load_kitti_poses(str(shared_data / "kitti_scans" / "poses.txt"))
    for frame, pose in zip(frames, poses):
        assert frame.points.dtype == np.float32 and frame.points.shape[1] == 4 and len(frame.points) > 100_000
        np.testing.assert_array_equal(frame.gt_pose, pose)
        assert np.median(np.linalg.norm(frame.points[:, :3], axis=1)) < 40  # metres, not garbage floats


def test_kitti_errors_are_raised_at_open_time(tmp_path: Path) -> None:
    (tmp_path / "velodyne").mkdir()
    for i in range(3):
        np.zeros((5, 4), np.float32).tofile(tmp_path / "velodyne" / f"{i:06d}.bin")
    (tmp_path / "poses.txt").write_text("1 0 0 0 0 1 0 0 0 0 1 0\n" * 2)
    with pytest.raises(DatasetError, match="poses.txt has 2 entries for 3 scans"):
        read_kitti(tmp_path)
    (tmp_path / "poses.txt").write_text("1 0 0 0 0 1 0 0 0 0 1 0\n" * 3)
    (tmp_path / "velodyne" / "000001.bin").write_bytes(b"\x00" * 10)
    frames = read_kitti(tmp_path)
    next(frames)
    with pytest.raises(DatasetError, match="000001.bin: 10 bytes"):
        next(frames)


def test_dataset_kind_and_dispatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DatasetError, match="no such file"):
        open_dataset(tmp_path / "missing")
    with pytest.raises(DatasetError, match="not a rosbag2 folder"):
        open_dataset(tmp_path)
    bev = tmp_path / "bev"
    (bev / "imgs").mkdir(parents=True)
    (bev / "pose.txt").write_text("")
    assert dataset_kind(bev) == "bev_images"
    monkeypatch.setitem(sys.modules, "bevplace_ros.datasets.bev_images", None)
    with pytest.raises(DatasetError, match="need bevplace_ros.datasets.bev_images"):
        open_dataset(bev)
    fake = types.ModuleType("bevplace_ros.datasets.bev_images")
    fake.open_bev_images = lambda path, **options: [Frame(0, 0.0, np.zeros((0, 4), np.float32))]
    monkeypatch.setitem(sys.modules, "bevplace_ros.datasets.bev_images", fake)
    assert open_dataset(bev)[0].index == 0


def test_ground_truth_falls_back_to_the_side_file(tmp_path: Path) -> None:
    base = preset_config("demo", 1)
    sequence = simulate_sequence(replace(base, lidar=replace(base.lidar, beams=8, columns=64), max_frames=4, keyframe_every=10))
    write_sequence(sequence, tmp_path / "bag", None, BagConfig(storage="mcap", gt_topic="/elsewhere"))
    frames = list(read_rosbag2(tmp_path / "bag"))
    expected = sequence.T_map_world @ sequence.gt_lidar(sequence.stamps)
    np.testing.assert_allclose(np.stack([f.gt_pose for f in frames]), expected, atol=1e-9)
    with (tmp_path / "bag" / "ground_truth.txt").open("a") as extra:
        extra.write("1 0 0 0 0 1 0 0 0 0 1 0\n")
    with pytest.raises(DatasetError, match="5 poses for 4 clouds"):
        read_rosbag2(tmp_path / "bag")


class _BagBuilder:
    """Hand-written bags: clouds and odometry at chosen stamps, optional /tf_static."""

    def __init__(self, path: Path) -> None:
        from rosbags.rosbag2 import Writer
        from rosbags.typesys import Stores, get_typestore

        self.store = get_typestore(Stores.ROS2_JAZZY)
        self.t = self.store.types
        self.writer = Writer(path, version=9)
        self.writer.open()
        self.connections: dict[str, object] = {}

    def _header(self, stamp: float, frame: str):
        sec = int(np.floor(stamp))
        return self.t["std_msgs/msg/Header"](stamp=self.t["builtin_interfaces/msg/Time"](sec=sec, nanosec=int(round((stamp - sec) * 1e9))), frame_id=frame)

    def _write(self, topic: str, msgtype: str, stamp: float, msg) -> None:
        if topic not in self.connections:
            self.connections[topic] = self.writer.add_connection(topic, msgtype, typestore=self.store)
        self.writer.write(self.connections[topic], int(stamp * 1e9), self.store.serialize_cdr(msg, msgtype))

    def cloud(self, topic: str, stamp: float, xyz: np.ndarray, frame: str = "velodyne", data: np.ndarray | None = None) -> None:
        fields = [self.t["sensor_msgs/msg/PointField"](name=f.name, offset=f.offset, datatype=f.datatype, count=f.count) for f in (FieldSpec("x", 0, FLOAT32), FieldSpec("y", 4, FLOAT32), FieldSpec("z", 8, FLOAT32))]
        payload = np.ascontiguousarray(xyz, dtype="<f4").view(np.uint8).reshape(-1) if data is None else data
        msg = self.t["sensor_msgs/msg/PointCloud2"](
            header=self._header(stamp, frame), height=1, width=len(xyz), fields=fields, is_bigendian=False,
            point_step=12, row_step=12 * len(xyz), data=payload, is_dense=True,
        )
        self._write(topic, "sensor_msgs/msg/PointCloud2", stamp, msg)

    def odom(self, stamp: float, pose: np.ndarray, topic: str = "/odom", child: str = "base_link") -> None:
        t = self.t
        q = matrix_to_quat_xyzw(pose)
        p = t["geometry_msgs/msg/Pose"](position=t["geometry_msgs/msg/Point"](*pose[:3, 3]), orientation=t["geometry_msgs/msg/Quaternion"](*q))
        zero = t["geometry_msgs/msg/Vector3"](0.0, 0.0, 0.0)
        msg = t["nav_msgs/msg/Odometry"](
            header=self._header(stamp, "odom"), child_frame_id=child,
            pose=t["geometry_msgs/msg/PoseWithCovariance"](pose=p, covariance=np.zeros(36)),
            twist=t["geometry_msgs/msg/TwistWithCovariance"](twist=t["geometry_msgs/msg/Twist"](linear=zero, angular=zero), covariance=np.zeros(36)),
        )
        self._write(topic, "nav_msgs/msg/Odometry", stamp, msg)

    def tf_static(self, parent: str, child: str, xyz: tuple[float, float, float]) -> None:
        t = self.t
        transform = t["geometry_msgs/msg/Transform"](translation=t["geometry_msgs/msg/Vector3"](*xyz), rotation=t["geometry_msgs/msg/Quaternion"](0.0, 0.0, 0.0, 1.0))
        stamped = t["geometry_msgs/msg/TransformStamped"](header=self._header(0.0, parent), child_frame_id=child, transform=transform)
        self._write("/tf_static", "tf2_msgs/msg/TFMessage", 0.0, t["tf2_msgs/msg/TFMessage"](transforms=[stamped]))

    def close(self) -> None:
        self.writer.close()


def test_odometry_is_interpolated_at_cloud_stamps(tmp_path: Path) -> None:
    bag = _BagBuilder(tmp_path / "bag")
    bag.tf_static("base_link", "mount", (1.0, 0.0, 0.0))
    bag.tf_static("mount", "velodyne", (0.0, 0.0, 2.0))
    for k in range(5):  # 1 Hz odometry driving +x at 2 m/s while turning 0.2 rad/s
        bag.odom(10.0 + k, xyyaw_to_matrix(2.0 * k, 0.0, 0.2 * k))
    xyz = np.array([[1.0, 2.0, 3.0], [np.nan, 0.0, 0.0]], np.float32)
    for stamp in (11.25, 14.0, 20.0):
        bag.cloud("/points", stamp, xyz)
    bag.close()
    assert next(iter(open_dataset(tmp_path / "bag"))).odom_pose is None  # 1 s odometry gap > default 0.5 s
    frames = list(open_dataset(tmp_path / "bag", max_gap_s=1.5))
    np.testing.assert_array_equal(frames[0].points, [[1.0, 2.0, 3.0, 0.0]])  # NaN point dropped, intensity 0
    mount = np.eye(4)
    mount[:3, 3] = [1.0, 0.0, 2.0]
    np.testing.assert_allclose(frames[0].odom_pose, xyyaw_to_matrix(2.5, 0.0, 0.25) @ mount, atol=1e-9)
    np.testing.assert_allclose(frames[1].odom_pose, xyyaw_to_matrix(8.0, 0.0, 0.8) @ mount, atol=1e-9)
    assert frames[2].odom_pose is None  # after the odometry ends
    assert frames[0].gt_pose is None and frames[0].stamp == pytest.approx(11.25)


def test_bag_errors_name_the_problem(tmp_path: Path) -> None:
    bag = _BagBuilder(tmp_path / "bag")
    bag.odom(0.0, np.eye(4))
    bag.cloud("/front", 0.0, np.zeros((2, 3)))
    bag.cloud("/rear", 0.0, np.zeros((2, 3)))
    bag.cloud("/broken", 0.0, np.zeros((2, 3)), data=np.zeros(5, np.uint8))
    bag.close()
    with pytest.raises(DatasetError, match=r"PointCloud2 topics in the bag: \['/broken', '/front', '/rear'\]"):
        read_rosbag2(tmp_path / "bag")
    with pytest.raises(DatasetError, match="does not connect 'base_link' to 'velodyne'"):
        list(read_rosbag2(tmp_path / "bag", points_topic="/front"))
    frames = list(read_rosbag2(tmp_path / "bag", points_topic="/rear", T_base_lidar=np.eye(4)))
    np.testing.assert_allclose(frames[0].odom_pose, np.eye(4))
    with pytest.raises(DatasetError, match="cloud 0 on /broken: data holds 5 bytes"):
        list(read_rosbag2(tmp_path / "bag", points_topic="/broken", T_base_lidar=np.eye(4)))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "metadata.yaml").write_text("not: a bag\n")
    with pytest.raises(DatasetError, match="not a readable rosbag2"):
        open_dataset(tmp_path / "junk")
