"""Start-up and shutdown shared by the three node executables, and the middleware profile they need."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, MutableMapping

# Fast DDS 3 reads FASTDDS_DEFAULT_PROFILES_FILE (rmw_fastrtps still honours the deprecated FASTRTPS_ name);
# FASTDDS_BUILTIN_TRANSPORTS is Fast DDS's other way of choosing transports. Any of them set: the user's own set-up.
DDS_SETTINGS = ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE", "FASTDDS_BUILTIN_TRANSPORTS")


def large_cloud_profile() -> Path:
    """The Fast DDS profile that carries LiDAR-size clouds between processes (README: middleware)."""
    from bevplace_ros.nodes.interfaces import package_share_file

    return package_share_file("config/fastdds_large_clouds.xml")


def use_large_cloud_profile(env: MutableMapping[str, str] = os.environ) -> None:
    """Point Fast DDS at large_cloud_profile() unless the user configured it; Fast DDS reads it once per
    process, at the first participant, so call this before the first rclpy.init (children inherit it)."""
    if not any(env.get(name) for name in DDS_SETTINGS):
        env["FASTDDS_DEFAULT_PROFILES_FILE"] = str(large_cloud_profile())


def run_node(make_node: Callable[[], object], args: list[str] | None = None) -> int:
    """Spin one node on a multi-threaded executor until Ctrl-C; a bad configuration exits 2 with its reason."""
    import rclpy
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

    from bevplace_ros.nodes.parameters import InvalidParameter

    rclpy.init(args=args if args is not None else sys.argv)
    try:
        node = make_node()
    except (InvalidParameter, ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"[bevplace_ros] cannot start: {err}", file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    executor = MultiThreadedExecutor()
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


def stop_node_process(process: subprocess.Popen, timeout_s: float = 60.0) -> str:
    """SIGINT, as ros2 launch sends on Ctrl-C; killed if it outlives the timeout. Returns what it printed, if piped."""
    process.send_signal(signal.SIGINT)
    try:
        output = process.communicate(timeout=timeout_s)[0]
    except subprocess.TimeoutExpired:
        process.kill()
        output = process.communicate()[0]
    return output or ""
