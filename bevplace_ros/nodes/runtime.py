"""Start-up and shutdown shared by the three node executables."""

from __future__ import annotations

import sys
from typing import Callable


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
