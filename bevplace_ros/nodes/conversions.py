"""ROS messages <-> the core's numpy types. Nothing here decides anything."""

from __future__ import annotations

import numpy as np
from builtin_interfaces.msg import Time
from geometry_msgs.msg import Pose, PoseWithCovariance

from bevplace_ros.pointcloud2 import FLOAT32, FieldSpec, create_cloud
from bevplace_ros.se3 import matrix_to_quat_xyzw, quat_xyzw_to_matrix

XYZI_FIELDS = [FieldSpec(name, 4 * i, FLOAT32, 1) for i, name in enumerate(("x", "y", "z", "intensity"))]


def stamp_to_ns(stamp: Time) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def stamp_to_sec(stamp: Time) -> float:
    return stamp_to_ns(stamp) * 1e-9


def ns_to_stamp(ns: int) -> Time:
    return Time(sec=int(ns // 1_000_000_000), nanosec=int(ns % 1_000_000_000))


def pose_to_matrix(pose: Pose) -> np.ndarray:
    q, p = pose.orientation, pose.position
    quat = np.array([q.x, q.y, q.z, q.w], dtype=float)
    if not np.all(np.isfinite(quat)) or not np.isclose(np.linalg.norm(quat), 1.0, atol=1e-3):
        raise ValueError(f"pose orientation is not a unit quaternion: {quat}")
    return quat_xyzw_to_matrix(quat, np.array([p.x, p.y, p.z], dtype=float))


def matrix_to_pose(T: np.ndarray) -> Pose:
    return matrices_to_poses(T[None])[0]


def matrices_to_poses(Ts: np.ndarray) -> list[Pose]:
    """(N, 4, 4) -> N Poses with one quaternion conversion for all: a path of thousands is published per keyframe."""
    if not len(Ts):
        return []
    rows = np.hstack([Ts[:, :3, 3], matrix_to_quat_xyzw(Ts)]).tolist()
    poses = []
    for x, y, z, qx, qy, qz, qw in rows:
        pose = Pose()
        pose.position.x, pose.position.y, pose.position.z = x, y, z
        pose.orientation.x, pose.orientation.y, pose.orientation.z, pose.orientation.w = qx, qy, qz, qw
        poses.append(pose)
    return poses


def pose_with_covariance(T: np.ndarray, covariance_ros: np.ndarray) -> PoseWithCovariance:
    return PoseWithCovariance(pose=matrix_to_pose(T), covariance=np.asarray(covariance_ros, dtype=float).reshape(36))


def covariance_matrix(msg: PoseWithCovariance) -> np.ndarray:
    return np.asarray(msg.covariance, dtype=float).reshape(6, 6)


def xyzi_cloud(header, points: np.ndarray):
    """PointCloud2 with float32 x, y, z, intensity of an (N, 4) array."""
    return create_cloud(header, XYZI_FIELDS, np.asarray(points, dtype=np.float32))
