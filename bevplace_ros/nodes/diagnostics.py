"""Counters, per-stage latency and warnings of a node, on /diagnostics at 1 Hz.

rclpy throttles a log call per call site, so one throttled line shared by every skip reason shows
only the first reason of a burst; here every key (a skip reason, "behind", ...) has its own
throttle, and every count is published, so nothing a node drops goes unseen.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Any, Callable

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.clock import Clock, ClockType
from rclpy.node import Node

LATENCY_WINDOW = 1000  # per-stage latency statistics cover the latest this many samples
PROBLEM_PREFIXES = ("skipped.", "dropped.", "shed.", "lost")  # counters whose growth makes the status WARN


class NodeDiagnostics:
    """One DiagnosticStatus per node, named after it: `counters()`, the skips by reason and latency statistics per stage.

    The status is WARN while a problem counter grew since the previous status, or while a
    condition is set (e.g. "no scans"), with the problems in its message; else OK.
    """

    def __init__(self, node: Node, counters: Callable[[], dict[str, Any]], period_s: float = 1.0, throttle_s: float = 5.0) -> None:
        self._node = node
        self._counters = counters
        self._throttle_s = throttle_s
        self._lock = threading.Lock()
        self._last_warned: dict[str, float] = {}
        self._conditions: dict[str, str] = {}
        self._previous: dict[str, Any] = {}
        self.skipped: dict[str, int] = {}  # reason -> inputs skipped for it
        self.last_skip: dict[str, str] = {}  # reason -> detail of its latest input (what a throttled warning may not show)
        self.shed_counts: dict[str, int] = {}  # work left undone under overload, by what was left
        self.latency_ms: dict[str, deque[float]] = {}
        self.publisher = node.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.timer = node.create_timer(period_s, self.publish, clock=Clock(clock_type=ClockType.STEADY_TIME))

    def stage(self, name: str) -> deque[float]:
        """The latency window [ms] of stage `name`; callers append to it."""
        return self.latency_ms.setdefault(name, deque(maxlen=LATENCY_WINDOW))

    def skip(self, reason: str, detail: str, what: str = "scan") -> None:
        """Count an input skipped for `reason` and warn, throttled per reason."""
        with self._lock:
            self.skipped[reason] = count = self.skipped.get(reason, 0) + 1
            self.last_skip[reason] = detail
        self.warning(f"skipped.{reason}", f"{what} skipped ({reason}, {count} so far): {detail}")

    def shed(self, what: str, text: str) -> None:
        """Count a piece of work left undone because the node is behind (`shed.<what>`) and warn, throttled per kind."""
        with self._lock:
            self.shed_counts[what] = count = self.shed_counts.get(what, 0) + 1
        self.warning(f"shed.{what}", f"{text} ({count} so far)")

    def warning(self, key: str, text: str) -> None:
        """Log `text` unless a warning with the same key was logged within the throttle period."""
        now = time.monotonic()
        with self._lock:
            if now - self._last_warned.get(key, -math.inf) < self._throttle_s:
                return
            self._last_warned[key] = now
        self._node.get_logger().warning(text)

    def condition(self, key: str, text: str | None) -> None:
        """Set (text) or clear (None) a lasting problem shown in the status until cleared."""
        with self._lock:
            if text is None:
                self._conditions.pop(key, None)
            else:
                self._conditions[key] = text

    def status(self) -> DiagnosticStatus:
        counters = self._counters()
        with self._lock:
            counters.update({f"skipped.{reason}": n for reason, n in self.skipped.items()})
            counters.update({f"shed.{what}": n for what, n in self.shed_counts.items()})
            conditions = list(self._conditions.values())
        grew = [f"{k} +{v - self._previous.get(k, 0)}" for k, v in counters.items()
                if k.startswith(PROBLEM_PREFIXES) and v > self._previous.get(k, 0)]
        self._previous = counters
        problems = conditions + grew
        values = [KeyValue(key=k, value=str(v)) for k, v in counters.items()]
        for stage, window in list(self.latency_ms.items()):
            samples = np.array(window.copy(), dtype=float)  # deque.copy() is atomic; iterating races the worker
            if len(samples):
                values += [KeyValue(key=f"latency.{stage}.{name}_ms", value=f"{stat:.1f}")
                           for name, stat in (("mean", samples.mean()), ("p95", np.percentile(samples, 95)), ("max", samples.max()))]
        level = DiagnosticStatus.WARN if problems else DiagnosticStatus.OK
        return DiagnosticStatus(level=level, name=self._node.get_fully_qualified_name(), message="; ".join(problems) or "ok",
                                hardware_id=self._node.get_name(), values=values)

    def publish(self) -> None:
        msg = DiagnosticArray(status=[self.status()])
        msg.header.stamp = self._node.get_clock().now().to_msg()
        self.publisher.publish(msg)


def status_values(status: DiagnosticStatus) -> dict[str, str]:
    """key -> value of a received status (what monitors and tests read)."""
    return {kv.key: kv.value for kv in status.values}
