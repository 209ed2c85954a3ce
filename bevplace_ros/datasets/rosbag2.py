"""Frames from a rosbag2 folder (sqlite3 or mcap) read with rosbags, no ROS installation needed.

Clouds come from one PointCloud2 topic; odometry and ground truth (nav_msgs/Odometry of the
base frame) are interpolated at each cloud stamp and moved to the cloud's frame with /tf_static.
Ground truth falls back to a KITTI-format ground_truth.txt beside the storage file (one LiDAR pose
per cloud), which is what `bevplace-ros simulate` writes too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

from bevplace_ros.datasets.frames import DatasetError, Frame
from bevplace_ros.pointcloud2 import PointCloud2Error, xyz_intensity
from bevplace_ros.se3 import invert, load_kitti_poses, quat_xyzw_to_matrix

CLOUD_TYPE = "sensor_msgs/msg/PointCloud2"
ODOM_TYPE = "nav_msgs/msg/Odometry"


class PoseTrack:
    """Time-stamped poses of one frame, interpolated (linear + slerp) at query stamps."""

    def __init__(self, stamps: np.ndarray, poses: np.ndarray, max_gap_s: float) -> None:
        order = np.argsort(stamps, kind="stable")
        self.stamps, self.poses, self.max_gap_s = stamps[order], poses[order], max_gap_s

    def at(self, stamp: float) -> np.ndarray | None:
        """Pose at `stamp`, or None outside the track or across a gap longer than max_gap_s."""
        from scipy.spatial.transform import Rotation, Slerp

        i = int(np.searchsorted(self.stamps, stamp))
        if i < len(self.stamps) and self.stamps[i] == stamp:
            return self.poses[i]
        if i == 0 or i == len(self.stamps) or self.stamps[i] - self.stamps[i - 1] > self.max_gap_s:
            return None
        t0, t1 = self.stamps[i - 1], self.stamps[i]
        w = (stamp - t0) / (t1 - t0)
        rotation = Slerp([0.0, 1.0], Rotation.from_matrix(self.poses[i - 1 : i + 1, :3, :3]))(w).as_matrix()
        pose = np.eye(4)
        pose[:3, :3] = rotation
        pose[:3, 3] = (1 - w) * self.poses[i - 1, :3, 3] + w * self.poses[i, :3, 3]
        return pose


def read_rosbag2(
    path: str | Path,
    points_topic: str | None = None,
    odom_topic: str = "/odom",
    gt_topic: str = "/ground_truth",
    max_gap_s: float = 0.5,
    T_base_lidar: np.ndarray | None = None,
) -> Iterator[Frame]:
    """Frames of the bag at `path`; the bag's topics and transforms are checked before the first frame.

    points_topic=None picks the bag's only PointCloud2 topic (or /points among several).
    T_base_lidar overrides /tf_static when the bag lacks it.
    """
    from rosbags.rosbag2 import Reader, ReaderError
    from rosbags.typesys import Stores, get_typestore

    root = Path(path)
    store = get_typestore(Stores.LATEST)
    try:
        reader = Reader(root)
        reader.open()
    except ReaderError as err:
        raise DatasetError(f"{root}: not a readable rosbag2: {err}") from None
    try:
        clouds = _cloud_connections(reader, points_topic)
        tracks, frames_of, static = _side_topics(reader, store, odom_topic, gt_topic, max_gap_s)
        cloud_count = sum(c.msgcount for c in clouds)
        side_file = root / "ground_truth.txt"
        gt_lines = None
        if "gt" not in tracks and side_file.is_file():
            gt_lines = load_kitti_poses(str(side_file))
            if len(gt_lines) != cloud_count:
                raise DatasetError(f"{side_file} has {len(gt_lines)} poses for {cloud_count} clouds on {clouds[0].topic}")
    except BaseException:
        reader.close()
        raise
    return _frames(reader, store, clouds, tracks, frames_of, static, gt_lines, T_base_lidar)


def _cloud_connections(reader: Any, points_topic: str | None) -> list[Any]:
    by_topic: dict[str, list[Any]] = {}
    for connection in reader.connections:
        if connection.msgtype == CLOUD_TYPE:
            by_topic.setdefault(connection.topic, []).append(connection)
    if points_topic is None:
        if len(by_topic) == 1:
            points_topic = next(iter(by_topic))
        elif "/points" in by_topic:
            points_topic = "/points"
    if points_topic not in by_topic:
        raise DatasetError(f"{reader.path}: no PointCloud2 topic {points_topic!r}; PointCloud2 topics in the bag: {sorted(by_topic)}")
    return by_topic[points_topic]


def _side_topics(reader: Any, store: Any, odom_topic: str, gt_topic: str, max_gap_s: float):
    """Odometry tracks by role, their child frames, and every static transform (child -> parent, T)."""
    wanted = {odom_topic: "odom", gt_topic: "gt"}
    connections = [c for c in reader.connections if (c.topic in wanted and c.msgtype == ODOM_TYPE) or (c.topic == "/tf_static")]
    samples: dict[str, list[tuple[float, np.ndarray]]] = {}
    frames_of: dict[str, str] = {}
    static: dict[str, tuple[str, np.ndarray]] = {}
    for connection, _, raw in reader.messages(connections=connections):
        msg = store.deserialize_cdr(raw, connection.msgtype)
        if connection.topic == "/tf_static":
            for tf in msg.transforms:
                r, t = tf.transform.rotation, tf.transform.translation
                static[tf.child_frame_id] = (tf.header.frame_id, quat_xyzw_to_matrix(np.array([r.x, r.y, r.z, r.w]), np.array([t.x, t.y, t.z])))
            continue
        role = wanted[connection.topic]
        p, q = msg.pose.pose.position, msg.pose.pose.orientation
        samples.setdefault(role, []).append((_seconds(msg.header.stamp), quat_xyzw_to_matrix(np.array([q.x, q.y, q.z, q.w]), np.array([p.x, p.y, p.z]))))
        frames_of[role] = msg.child_frame_id
    tracks = {role: PoseTrack(np.array([s for s, _ in rows]), np.stack([T for _, T in rows]), max_gap_s) for role, rows in samples.items()}
    return tracks, frames_of, static


def _seconds(stamp: Any) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def _to_root(frame: str, static: dict[str, tuple[str, np.ndarray]]) -> tuple[str, np.ndarray]:
    """(root frame, T_root_frame) by walking the static tree upwards."""
    T = np.eye(4)
    seen = {frame}
    while frame in static:
        parent, T_parent_frame = static[frame]
        T = T_parent_frame @ T
        frame = parent
        if frame in seen:
            raise DatasetError(f"/tf_static has a cycle through {frame!r}")
        seen.add(frame)
    return frame, T


def _mount(base: str, lidar: str, static: dict[str, tuple[str, np.ndarray]], override: np.ndarray | None) -> np.ndarray:
    """T_base_lidar from /tf_static (or the override) so base-frame odometry becomes LiDAR poses."""
    if override is not None:
        return np.asarray(override, float)
    if base == lidar:
        return np.eye(4)
    base_root, T_root_base = _to_root(base, static)
    lidar_root, T_root_lidar = _to_root(lidar, static)
    if base_root != lidar_root:
        raise DatasetError(f"/tf_static does not connect {base!r} to {lidar!r}; pass T_base_lidar")
    return invert(T_root_base) @ T_root_lidar


def _frames(reader, store, clouds, tracks, frames_of, static, gt_lines, T_base_lidar) -> Iterator[Frame]:
    mounts: dict[tuple[str, str], np.ndarray] = {}
    try:
        for index, (connection, _, raw) in enumerate(reader.messages(connections=clouds)):
            msg = store.deserialize_cdr(raw, connection.msgtype)
            stamp = _seconds(msg.header.stamp)
            try:
                points = xyz_intensity(msg)
            except PointCloud2Error as err:
                raise DatasetError(f"{reader.path}: cloud {index} on {connection.topic}: {err}") from None
            poses = {}
            for role, track in tracks.items():
                key = (frames_of[role], msg.header.frame_id)
                if key not in mounts:
                    mounts[key] = _mount(*key, static, T_base_lidar)
                base_pose = track.at(stamp)
                poses[role] = None if base_pose is None else base_pose @ mounts[key]
            gt = gt_lines[index] if gt_lines is not None else poses.get("gt")
            yield Frame(index, stamp, points, gt, poses.get("odom"))
    finally:
        reader.close()


def sensor_mount(path: str | Path, points_topic: str | None = None, odom_topic: str = "/odom") -> np.ndarray:
    """T_base_lidar of a bag: the odometry child frame to the scans' frame, through /tf_static."""
    from rosbags.rosbag2 import Reader
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.LATEST)
    with Reader(Path(path)) as reader:
        clouds = _cloud_connections(reader, points_topic)
        _, frames_of, static = _side_topics(reader, store, odom_topic, "", 0.5)
        first = next(reader.messages(connections=clouds), None)
        if first is None or "odom" not in frames_of:
            raise DatasetError(f"{path}: needs a scan and odometry on {odom_topic} to find the LiDAR mount")
        lidar_frame = store.deserialize_cdr(first[2], first[0].msgtype).header.frame_id
    return _mount(frames_of["odom"], lidar_frame, static, None)
