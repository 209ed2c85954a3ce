"""Write a simulated drive as a ROS 2 bag (sqlite3 or mcap) and/or a KITTI-style folder.

The bag carries what a real robot records: PointCloud2 in the Velodyne layout, drifting
/odom (odom -> base_link), /ground_truth (map -> base_link, map = first LiDAR frame),
/tf_static (base_link -> lidar), plus ground_truth.txt (KITTI format, one LiDAR pose per cloud)
beside the storage file. Each output folder is filled under a temporary name and renamed into
place, so an interrupted run never leaves a half-written data set behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bevplace_ros.pointcloud2 import pack_points
from bevplace_ros.se3 import matrix_to_quat_xyzw
from bevplace_ros.sim.sequence import SimulatedSequence

STORAGES = ("sqlite3", "mcap")
DISTROS = ("humble", "jazzy")


@dataclass(frozen=True)
class BagConfig:
    storage: str = "sqlite3"
    distro: str = "humble"  # typestore the message definitions come from
    points_topic: str = "/points"
    odom_topic: str = "/odom"
    gt_topic: str = "/ground_truth"
    odom_rate_hz: float = 20.0
    start_time_s: int = 1_700_000_000  # fixed epoch so output is byte-identical across runs
    map_frame: str = "map"
    odom_frame: str = "odom"
    base_frame: str = "base_link"
    lidar_frame: str = "lidar"

    def __post_init__(self) -> None:
        if self.storage not in STORAGES:
            raise ValueError(f"BagConfig.storage must be one of {STORAGES}, got {self.storage!r}")
        if self.distro not in DISTROS:
            raise ValueError(f"BagConfig.distro must be one of {DISTROS}, got {self.distro!r}")
        if not 1 <= self.odom_rate_hz <= 1000:
            raise ValueError(f"BagConfig.odom_rate_hz must be in [1, 1000], got {self.odom_rate_hz}")
        for name in ("points_topic", "odom_topic", "gt_topic"):
            if not getattr(self, name).startswith("/"):
                raise ValueError(f"BagConfig.{name} must be an absolute topic name, got {getattr(self, name)!r}")


def write_sequence(
    sequence: SimulatedSequence,
    bag_dir: Path | None,
    kitti_dir: Path | None,
    config: BagConfig = BagConfig(),
    progress: Callable[[int], None] | None = None,
) -> None:
    """Scan every keyframe once and hand it to each requested output."""
    targets = [p for p in (bag_dir, kitti_dir) if p is not None]
    for path in targets:
        if Path(path).exists():
            raise FileExistsError(f"{path} exists; remove it or choose another output folder")
    with _StagedFolder(bag_dir) as bag_tmp, _StagedFolder(kitti_dir) as kitti_tmp:
        bag = _BagSink(sequence, bag_tmp, config) if bag_tmp else None
        kitti = _KittiSink(kitti_tmp) if kitti_tmp else None
        for index in range(len(sequence)):
            points = sequence.scan(index)
            if bag:
                bag.add_scan(index, points)
            if kitti:
                kitti.add_scan(index, points)
            if progress:
                progress(index)
        poses = sequence.T_map_world @ sequence.gt_lidar(sequence.stamps)
        if bag:
            bag.close(poses)
        if kitti:
            kitti.close(poses, sequence.stamps - sequence.stamps[0])


class _StagedFolder:
    """Context manager giving a temporary folder that is renamed to `final` on success."""

    def __init__(self, final: Path | None) -> None:
        self.final = None if final is None else Path(final)
        self.parent: Path | None = None

    def __enter__(self) -> Path | None:
        if self.final is None:
            return None
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.parent = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.", dir=self.final.parent))
        return self.parent / self.final.name

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.parent is None:
            return
        if exc_type is None:
            os.replace(self.parent / self.final.name, self.final)
        shutil.rmtree(self.parent, ignore_errors=True)


def kitti_pose_lines(poses: np.ndarray) -> str:
    """12 numbers per line (row-major 3x4), the format of KITTI's poses.txt."""
    return "".join(" ".join(f"{v:.12e}" for v in pose[:3, :4].reshape(-1)) + "\n" for pose in poses)


class _KittiSink:
    """velodyne/NNNNNN.bin (float32 x, y, z, intensity), poses.txt, times.txt."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "velodyne").mkdir(parents=True)

    def add_scan(self, index: int, points: np.ndarray) -> None:
        xyzi = np.column_stack([points["x"], points["y"], points["z"], points["intensity"]]).astype("<f4")
        (self.root / "velodyne" / f"{index:06d}.bin").write_bytes(xyzi.tobytes())

    def close(self, poses: np.ndarray, times: np.ndarray) -> None:
        (self.root / "poses.txt").write_text(kitti_pose_lines(poses))
        (self.root / "times.txt").write_text("".join(f"{t:.6e}\n" for t in times))


class _BagSink:
    """Streams clouds into a rosbags Writer, interleaving odometry and ground truth by time."""

    def __init__(self, sequence: SimulatedSequence, path: Path, config: BagConfig) -> None:
        from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
        from rosbags.rosbag2 import StoragePlugin, Writer
        from rosbags.typesys import Stores, get_typestore

        self.sequence, self.path, self.config = sequence, path, config
        self.store = get_typestore(Stores.ROS2_HUMBLE if config.distro == "humble" else Stores.ROS2_JAZZY)
        self.types = self.store.types
        plugin = StoragePlugin.SQLITE3 if config.storage == "sqlite3" else StoragePlugin.MCAP
        self.writer = Writer(path, version=Writer.VERSION_LATEST, storage_plugin=plugin)
        self.writer.open()
        zero = QosTime(0, 0)
        latched = Qos(QosHistory.KEEP_LAST, 1, QosReliability.RELIABLE, QosDurability.TRANSIENT_LOCAL, zero, zero, QosLiveliness.AUTOMATIC, zero, False)
        self.conn = {
            "tf": self.writer.add_connection("/tf_static", "tf2_msgs/msg/TFMessage", typestore=self.store, offered_qos_profiles=[latched]),
            "points": self.writer.add_connection(config.points_topic, "sensor_msgs/msg/PointCloud2", typestore=self.store),
            "odom": self.writer.add_connection(config.odom_topic, "nav_msgs/msg/Odometry", typestore=self.store),
            "gt": self.writer.add_connection(config.gt_topic, "nav_msgs/msg/Odometry", typestore=self.store),
        }
        self.start_ns = config.start_time_s * 10**9
        period_ns = round(1e9 / config.odom_rate_hz)
        end_ns = round((sequence.stamps[-1] + sequence.config.lidar.scan_period_s) * 1e9)
        self.odom_ns = np.arange(0, end_ns + 1, period_ns)
        odom_times = self.odom_ns / 1e9
        self.odom = sequence.odom_base(odom_times)
        self.gt = sequence.T_map_world @ sequence.gt_base(odom_times)
        self.twist = np.gradient(np.column_stack([self.odom[:, 0, 3], self.odom[:, 1, 3], np.unwrap(np.arctan2(self.odom[:, 1, 0], self.odom[:, 0, 0]))]), odom_times, axis=0)
        self.next_odom = 0
        self._write("tf", 0, self._tf_static())

    def _header(self, stamp_ns: int, frame: str) -> Any:
        t = self.types
        stamp = t["builtin_interfaces/msg/Time"](sec=int(stamp_ns // 10**9), nanosec=int(stamp_ns % 10**9))
        return t["std_msgs/msg/Header"](stamp=stamp, frame_id=frame)

    def _write(self, key: str, rel_ns: int, msg: Any) -> None:
        self.writer.write(self.conn[key], self.start_ns + int(rel_ns), self.store.serialize_cdr(msg, msg.__msgtype__))

    def _tf_static(self) -> Any:
        t = self.types
        T = self.sequence.T_base_lidar
        transform = t["geometry_msgs/msg/Transform"](translation=t["geometry_msgs/msg/Vector3"](*T[:3, 3]), rotation=t["geometry_msgs/msg/Quaternion"](*matrix_to_quat_xyzw(T)))
        stamped = t["geometry_msgs/msg/TransformStamped"](header=self._header(self.start_ns, self.config.base_frame), child_frame_id=self.config.lidar_frame, transform=transform)
        return t["tf2_msgs/msg/TFMessage"](transforms=[stamped])

    def _odometry(self, rel_ns: int, pose: np.ndarray, frame: str, twist: np.ndarray | None) -> Any:
        t = self.types
        q = matrix_to_quat_xyzw(pose)
        vec, zero36 = t["geometry_msgs/msg/Vector3"], np.zeros(36)
        pose_msg = t["geometry_msgs/msg/Pose"](position=t["geometry_msgs/msg/Point"](*pose[:3, 3]), orientation=t["geometry_msgs/msg/Quaternion"](*q))
        if twist is None:
            linear, angular = vec(0.0, 0.0, 0.0), vec(0.0, 0.0, 0.0)
        else:  # body-frame forward speed and yaw rate, as wheel odometry reports them
            c, s = pose[0, 0], pose[1, 0]
            linear, angular = vec(float(c * twist[0] + s * twist[1]), 0.0, 0.0), vec(0.0, 0.0, float(twist[2]))
        return t["nav_msgs/msg/Odometry"](
            header=self._header(self.start_ns + rel_ns, frame),
            child_frame_id=self.config.base_frame,
            pose=t["geometry_msgs/msg/PoseWithCovariance"](pose=pose_msg, covariance=zero36),
            twist=t["geometry_msgs/msg/TwistWithCovariance"](twist=t["geometry_msgs/msg/Twist"](linear=linear, angular=angular), covariance=zero36.copy()),
        )

    def _flush_odometry(self, until_ns: float) -> None:
        while self.next_odom < len(self.odom_ns) and self.odom_ns[self.next_odom] <= until_ns:
            k = self.next_odom
            rel = int(self.odom_ns[k])
            self._write("odom", rel, self._odometry(rel, self.odom[k], self.config.odom_frame, self.twist[k]))
            self._write("gt", rel, self._odometry(rel, self.gt[k], self.config.map_frame, None))
            self.next_odom += 1

    def add_scan(self, index: int, points: np.ndarray) -> None:
        t = self.types
        rel = round(self.sequence.stamps[index] * 1e9)
        self._flush_odometry(rel)
        specs, data, step = pack_points(points)
        fields = [t["sensor_msgs/msg/PointField"](name=f.name, offset=f.offset, datatype=f.datatype, count=f.count) for f in specs]
        cloud = t["sensor_msgs/msg/PointCloud2"](
            header=self._header(self.start_ns + rel, self.config.lidar_frame),
            height=1, width=len(points), fields=fields, is_bigendian=False, point_step=step,
            row_step=step * len(points), data=np.frombuffer(data, dtype=np.uint8), is_dense=True,
        )
        self._write("points", rel, cloud)

    def close(self, lidar_poses: np.ndarray) -> None:
        self._flush_odometry(np.inf)
        self.writer.close()
        (self.path / "ground_truth.txt").write_text(kitti_pose_lines(lidar_poses))
