"""A background worker so a slow stage never blocks a subscriber callback.

`QueueWorker` keeps a bounded FIFO and, beyond it, either drops the oldest (loop candidates and
raw scans: memory must not grow, and the node sheds cheaper work well before that bound) or makes
the submitter wait for room (keyframes: never lost, the wait pushes back on the stage before). It
counts what it drops so the node can warn with numbers, and tells the handler how many items wait
behind the current one, which is how the nodes decide to shed work.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable

from bevplace_ros.nodes.parameters import ParamSpec

# One thread by default: on the shared 2-core machine a place keyframe took 194 ms on 1 thread and 775 ms on torch's
# default 2 (README: nodes); OpenMP threads spin against each other and against the other nodes' processes.
TORCH_THREADS = ParamSpec("torch_threads", 1, "Torch intra-op threads of the place network; 0: torch's default (one per core). "
                          "The launch file's three processes share the cores, so more threads per process oversubscribe them "
                          "(registration runs its torch parts on one thread already).", 0, 256, runtime=False)


def limit_torch_threads(count: int) -> None:
    """Apply TORCH_THREADS (process-wide: in an in-process replay the registrar sets its own one thread too)."""
    if count:
        import torch

        torch.set_num_threads(count)


class QueueWorker:
    """Handles items in order; beyond `max_size` pending items the oldest is dropped (and counted), or with
    `block` the submitter waits for room (nothing is dropped)."""

    def __init__(self, handle: Callable[[Any], None], on_error: Callable[[Exception], None], name: str, max_size: int,
                 block: bool = False) -> None:
        self.max_size = max_size
        self.block = block
        self._handle = handle
        self._on_error = on_error
        self._cond = threading.Condition()
        self._items: deque[Any] = deque()
        self._busy = False
        self._stop = False
        self.dropped = 0
        self.handled = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: Any) -> None:
        with self._cond:
            while self.block and len(self._items) >= self.max_size and not self._stop:
                self._cond.wait()
            self._items.append(item)
            while len(self._items) > self.max_size:
                self._items.popleft()
                self.dropped += 1
            self._cond.notify_all()

    def waiting(self) -> list[Any]:
        """The items queued behind the one being handled, oldest first (a snapshot)."""
        with self._cond:
            return list(self._items)

    def pending(self) -> int:
        with self._cond:
            return len(self._items)

    def idle(self) -> bool:
        """Nothing queued and nothing being handled (used by replay's flow control)."""
        with self._cond:
            return not self._items and not self._busy

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=10.0)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                item = self._items.popleft()
                self._busy = True
                self._cond.notify_all()  # room for a blocked submitter
            try:
                self._handle(item)
            except Exception as err:  # a bad item must never kill the node's worker
                self._on_error(err)
            finally:
                with self._cond:
                    self._busy = False
                    self.handled += 1
                    self._cond.notify_all()
