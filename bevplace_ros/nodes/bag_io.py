"""rosbag2 in and out for replay: raw CDR messages, never decoded on the way through."""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Iterator

import numpy as np

from bevplace_ros.datasets.rosbag2 import sensor_mount


def header_stamp_ns(raw: bytes) -> int:
    """The header stamp of a serialised message that starts with a std_msgs/Header (PointCloud2, Odometry), read
    from the CDR bytes without decoding the rest: a 4-byte encapsulation, then int32 sec and uint32 nanosec."""
    if len(raw) < 12 or raw[1] not in (0, 1):
        raise ValueError(f"not a CDR message with a header ({len(raw)} bytes)")
    order = "little" if raw[1] == 1 else "big"
    return int.from_bytes(raw[4:8], order, signed=True) * 10**9 + int.from_bytes(raw[8:12], order)


class BagInput:
    """The scans and odometry of one bag, in an order that never makes a node extrapolate odometry."""

    def __init__(self, path: Path, points_topic: str, odom_topic: str) -> None:
        from rosbags.rosbag2 import Reader

        self.path, self.points_topic, self.odom_topic = Path(path), points_topic, odom_topic
        with Reader(self.path) as reader:
            topics = {c.topic: c for c in reader.connections}
            for topic, kind in ((points_topic, "sensor_msgs/msg/PointCloud2"), (odom_topic, "nav_msgs/msg/Odometry")):
                if topic not in topics or topics[topic].msgtype != kind:
                    raise ValueError(f"{self.path}: needs {kind} on {topic}; it has {sorted(topics)}")
            self.scan_count = topics[points_topic].msgcount

    def base_to_sensor(self) -> np.ndarray:
        """x y z roll pitch yaw of the LiDAR in the odometry child frame, from the bag's /tf_static."""
        from scipy.spatial.transform import Rotation

        T = sensor_mount(self.path, self.points_topic, self.odom_topic)
        return np.r_[T[:3, 3], Rotation.from_matrix(T[:3, :3]).as_euler("xyz")]

    def messages_lidar_after_odometry(self) -> Iterator[tuple[str, int, bytes]]:
        """('odom' | 'points', stamp_ns, raw) in log order, except that each scan is held back until
        the first odometry message at or after its stamp has gone out (or the bag ends)."""
        from rosbags.rosbag2 import Reader

        held: list[tuple[int, bytes]] = []
        with Reader(self.path) as reader:
            wanted = [c for c in reader.connections if c.topic in (self.points_topic, self.odom_topic)]
            for connection, stamp_ns, raw in reader.messages(connections=wanted):
                if connection.topic == self.odom_topic:
                    yield "odom", stamp_ns, bytes(raw)
                    while held and held[0][0] <= stamp_ns:
                        yield ("points", *held.pop(0))
                else:
                    held.append((stamp_ns, bytes(raw)))
        for stamp_ns, raw in held:
            yield "points", stamp_ns, raw

    def open_writer(self, path: Path, topics: dict[str, str]) -> "BagOutput":
        return BagOutput(path, topics, "mcap" if any(self.path.glob("*.mcap")) else "sqlite3")


class BagOutput:
    """A rosbag2 that records raw CDR messages by topic name.

    rosbags' sqlite3 storage may only be used from the thread that opened it, while messages
    arrive on executor threads: one writer thread owns the bag and drains a queue.
    """

    def __init__(self, path: Path, topics: dict[str, str], storage: str) -> None:
        if Path(path).exists():
            raise FileExistsError(f"{path} exists; rosbag2 output needs a new folder")
        self._queue: queue.Queue[tuple[str, int, bytes] | None] = queue.Queue(maxsize=10000)
        self._opened = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(Path(path), topics, storage), name="bag_output", daemon=True)
        self._thread.start()
        self._opened.wait()
        if self._error is not None:
            raise self._error

    def write(self, topic: str, stamp_ns: int, raw: bytes) -> None:
        self._queue.put((topic, stamp_ns, raw))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"recording failed: {self._error}") from self._error

    def _run(self, path: Path, topics: dict[str, str], storage: str) -> None:
        from rosbags.rosbag2 import StoragePlugin, Writer

        from bevplace_ros.nodes.interfaces import rosbags_typestore

        try:
            store = rosbags_typestore()
            plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
            writer = Writer(path, version=Writer.VERSION_LATEST, storage_plugin=plugin)
            writer.open()
            connections = {t: writer.add_connection("/" + t.lstrip("/"), msgtype, typestore=store) for t, msgtype in topics.items()}
        except BaseException as err:  # reported to the constructor's caller
            self._error = err
            self._opened.set()
            return
        self._opened.set()
        try:
            while (item := self._queue.get()) is not None:
                topic, stamp_ns, raw = item
                writer.write(connections[topic], stamp_ns, raw)
        except BaseException as err:
            self._error = err
        finally:
            writer.close()
