"""Do LiDAR-size clouds reach the place node in another process? The share it processes, measured.

    python -m bevplace_ros.nodes.cloud_delivery [--scans 100] [--rate 10] [--beams 64] [--points-qos sensor_data]

runs place_recognition_node and a publisher as two processes, once with the package's Fast DDS
profile and once with Fast DDS's defaults, and prints the share of clouds the node processed.
The publisher sends a simulated sweep in the Velodyne point layout (64 x 2048 rays: ~2.7 MB) with
sensor-data QoS as a driver does (or reliable QoS, the node's points_qos alternative), and reads
the node's counters from /diagnostics. A small warm-up scan first becomes the only keyframe
(odometry stands still), so every later cloud is cheap to process: what is missing was lost in
transport (`lost`, or never received) or dropped because the node could not keep up (`dropped_behind`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

NODE = "/place_recognition_node"
START_NS = 10**9
WARMUP_STRIDE = 16  # the warm-up scan keeps every 16th point: ~170 kB, under every transport's limit


@dataclass(frozen=True)
class Delivery:
    sent: int
    received: int  # by the node's subscription
    processed: int  # handled and not skipped
    dropped_behind: int
    lost: int  # reported lost by the middleware
    cloud_bytes: int

    @property
    def processed_share(self) -> float:
        return self.processed / self.sent


def lidar_sweep(beams: int) -> np.ndarray:
    """One still sweep of the simulator's urban block in the Velodyne PointXYZIRT layout."""
    from bevplace_ros.se3 import make_transform
    from bevplace_ros.sim.lidar import LidarConfig, scan
    from bevplace_ros.sim.world import WorldConfig, build_world

    world = build_world(WorldConfig(seed=1, style="urban", blocks_x=1, blocks_y=1))
    lidar = LidarConfig(beams=beams, columns=2048, fov_up_deg=2.0, fov_down_deg=-24.8, max_range_m=120.0, motion_skew=False)
    xy = np.array([world.road_x[0] + 30.0, world.road_y[0] + 1.0])
    pose = make_transform(np.eye(3), [xy[0], xy[1], world.ground.height(xy[None])[0] + 1.73])
    return scan(world, pose, lidar, np.random.default_rng(0))


def publish(scans: int, rate_hz: float, beams: int, points_qos: str, timeout_s: float) -> Delivery:
    """The publisher process: odometry, a warm-up keyframe, then `scans` clouds at `rate_hz`."""
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from nav_msgs.msg import Odometry
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from sensor_msgs.msg import PointCloud2
    from std_msgs.msg import Header

    from bevplace_ros.nodes.conversions import matrix_to_pose, ns_to_stamp
    from bevplace_ros.nodes.diagnostics import status_values
    from bevplace_ros.pointcloud2 import create_cloud, field_specs_from_dtype

    sweep = lidar_sweep(beams)
    fields = field_specs_from_dtype(sweep.dtype)
    rclpy.init()
    node = rclpy.create_node("cloud_delivery_publisher")
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    status: dict[str, str] = {}
    statuses = [0]

    def on_diagnostics(msg: DiagnosticArray) -> None:
        for s in msg.status:
            if s.name == NODE:
                status.clear()
                status.update(status_values(s))
                statuses[0] += 1

    def wait(predicate: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"cloud_delivery: gave up waiting {timeout_s:.0f} s for {what}; node status {status}")
            executor.spin_once(timeout_sec=0.05)

    def count(key: str) -> int:
        return int(status.get(key, 0))

    node.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 100)
    driver_qos = qos_profile_sensor_data if points_qos == "sensor_data" else QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
    clouds = node.create_publisher(PointCloud2, "points", driver_qos)
    odometry = node.create_publisher(Odometry, "odom", QoSProfile(depth=200, reliability=ReliabilityPolicy.RELIABLE))

    def cloud(i: int, points: np.ndarray) -> PointCloud2:
        return create_cloud(Header(stamp=ns_to_stamp(START_NS + i * round(1e9 / rate_hz)), frame_id="lidar"), fields, points)

    try:
        wait(lambda: clouds.get_subscription_count() > 0 and odometry.get_subscription_count() > 0 and count("publishers") > 0,
             "the place node and this publisher to match, both ways")
        odom = Odometry()
        odom.header.frame_id, odom.pose.pose = "odom", matrix_to_pose(np.eye(4))
        odom_count = scans + 20
        for i in range(odom_count):  # standing still over every stamp: no keyframe after the first
            odom.header.stamp = ns_to_stamp(START_NS + (i - 5) * round(1e9 / rate_hz))
            odometry.publish(odom)
        wait(lambda: count("odometry") >= odom_count, "odometry to reach the node")
        for warmups in range(1, 11):  # best effort: resend until the warm-up scan is a keyframe
            clouds.publish(cloud(warmups - 1, sweep[::WARMUP_STRIDE]))
            before = statuses[0]
            wait(lambda: count("keyframes") > 0 or statuses[0] >= before + 5, "the warm-up keyframe")
            if count("keyframes"):
                break
        else:
            raise TimeoutError(f"cloud_delivery: 10 warm-up scans and no keyframe; node status {status}")
        base = dict(status)
        period = 1.0 / rate_hz
        start = time.monotonic()
        for i in range(scans):
            msg = cloud(warmups + i, sweep)
            time.sleep(max(0.0, start + i * period - time.monotonic()))  # the sensor's rate, not a wait for an event
            clouds.publish(msg)
            executor.spin_once(timeout_sec=0.0)
        changed = {"counts": None, "at": 0}

        def quiet() -> bool:
            """Three statuses in a row with nothing new received, and everything received handled or dropped."""
            counts = (status.get("received"), status.get("handled"))
            if counts != changed["counts"]:
                changed.update(counts=counts, at=statuses[0])
            return count("handled") + count("dropped.unexamined") >= count("received") and statuses[0] - changed["at"] >= 3

        wait(quiet, "the node to settle")
        diff = {k: count(k) - int(base.get(k, 0)) for k in ("received", "processed", "dropped.scans_behind", "dropped.unexamined", "lost")}
        dropped = diff["dropped.scans_behind"] + diff["dropped.unexamined"]
        return Delivery(scans, diff["received"], diff["processed"], dropped, diff["lost"], len(msg.data))
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


def run_delivery(env: dict[str, str], scans: int = 100, rate_hz: float = 10.0, beams: int = 64, points_qos: str = "sensor_data",
                 timeout_s: float = 120.0, scan_queue: int = 3) -> tuple[Delivery, str]:
    """Place node and publisher as two processes with `env`; (what the node processed, the node's log).

    A deep `scan_queue` takes the node's speed out of the figure, leaving only what the transport lost.
    """
    node_cmd = [sys.executable, "-m", "bevplace_ros.nodes.place_recognition_node", "--ros-args", "-p", "place.weights:=random",
                "-p", f"points_qos:={points_qos}", "-p", f"scan_queue:={scan_queue}"]
    from bevplace_ros.nodes.runtime import stop_node_process

    node = subprocess.Popen(node_cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        publisher = subprocess.run([sys.executable, "-m", "bevplace_ros.nodes.cloud_delivery", "publish", "--scans", str(scans),
                                    "--rate", str(rate_hz), "--beams", str(beams), "--points-qos", points_qos, "--timeout", str(timeout_s)],
                                   env=env, capture_output=True, text=True, timeout=10 * timeout_s)
    finally:
        log = stop_node_process(node)
    if publisher.returncode != 0:
        raise RuntimeError(f"the publisher failed:\n{publisher.stderr[-3000:]}\nnode log:\n{log[-3000:]}")
    fields = json.loads(publisher.stdout.strip().splitlines()[-1])
    return Delivery(**fields), log


def profile_env(with_profile: bool) -> dict[str, str]:
    """This environment with the package's Fast DDS profile, or with Fast DDS's defaults."""
    from bevplace_ros.nodes.runtime import DDS_SETTINGS, large_cloud_profile

    env = {k: v for k, v in os.environ.items() if k not in DDS_SETTINGS}
    if with_profile:
        env["FASTDDS_DEFAULT_PROFILES_FILE"] = str(large_cloud_profile())
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", nargs="?", choices=("measure", "publish"), default="measure")
    parser.add_argument("--scans", type=int, default=100)
    parser.add_argument("--rate", type=float, default=10.0, help="clouds per second")
    parser.add_argument("--beams", type=int, default=64, help="64: ~2.7 MB clouds; 128: ~5 MB")
    parser.add_argument("--points-qos", choices=("sensor_data", "reliable"), default="sensor_data", help="of the publisher and the node")
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline of each wait [s]")
    args = parser.parse_args(argv)
    if args.role == "publish":
        print(json.dumps(asdict(publish(args.scans, args.rate, args.beams, args.points_qos, args.timeout))))
        return 0
    for with_profile in (True, False):
        result, _ = run_delivery(profile_env(with_profile), args.scans, args.rate, args.beams, args.points_qos, args.timeout)
        name = "config/fastdds_large_clouds.xml" if with_profile else "Fast DDS defaults"
        print(f"{name:34s} {args.points_qos:11s} {result.cloud_bytes / 1e6:.2f} MB clouds: processed {result.processed}/{result.sent} "
              f"({100 * result.processed_share:.0f} %), received {result.received}, lost {result.lost}, dropped as behind {result.dropped_behind}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
