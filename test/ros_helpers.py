"""Helpers for tests that run real rclpy nodes."""

from __future__ import annotations

import time


def spin_until(executor, predicate, timeout_s: float = 60.0) -> bool:
    """Spin `executor` until `predicate()` holds; the deadline only ends a wait that failed, so it is generous
    (discovery and delivery take seconds on a loaded machine)."""
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.05)
    return bool(predicate())


def handle_scan(place_node, cloud, timeout_s: float = 60.0) -> None:
    """Hand `cloud` to a place node as its `points` subscription does, and wait until both its stages are done with it."""
    before = place_node.clouds_handled
    place_node._on_cloud(cloud)
    deadline = time.monotonic() + timeout_s
    while not (place_node.clouds_handled > before and place_node.idle()):
        assert time.monotonic() < deadline, "the place node never finished the scan"
        time.sleep(0.005)


def pose_graph_with_client(context, name: str):
    """(pose graph node, a plain client node, a single-threaded executor spinning both), in a namespace of this
    process's own so nothing else on the machine shares their topics."""
    import os

    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    from bevplace_ros.nodes.pose_graph_node import PoseGraphNode

    namespace = f"/{name}_{os.getpid()}"
    node = PoseGraphNode(context=context, namespace=namespace)
    client = rclpy.create_node(name, context=context, namespace=namespace)
    executor = SingleThreadedExecutor(context=context)
    for n in (node, client):
        executor.add_node(n)
    return node, client, executor
