"""Helpers for tests that run real rclpy nodes."""

from __future__ import annotations

import time


def spin_until(executor, predicate, timeout_s: float = 10.0) -> bool:
    """Spin `executor` until `predicate()` holds or the (generous) timeout passes."""
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.05)
    return bool(predicate())
