"""The three nodes as separate processes, started as the launch file starts them, with their CPU and memory sampled.

What a real-time replay needs to say per node: how much of a core it used while the sensor streamed and
how much memory it peaked at. Each node runs its own Python (`python -m bevplace_ros.nodes.<name>`, what the
console scripts run) with the params YAML, the Fast DDS profile for large clouds and a private ROS domain;
leaving the context stops every one of them (SIGINT, as ros2 launch does, then SIGKILL), so none outlives it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

NODE_NAMES = ("place_recognition_node", "registration_node", "pose_graph_node")
SAMPLE_PERIOD_S = 0.5
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Sample:
    """One reading of every node: CPU seconds used so far (user + system) and peak resident memory."""

    wall: float  # time.perf_counter()
    cpu_s: dict[str, float]
    peak_rss_mib: dict[str, float]


def read_usage(pid: int) -> tuple[float, float]:
    """(utime + stime in seconds, VmHWM in MiB) of a live process, from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces
    cpu_s = (int(fields[11]) + int(fields[12])) / _TICKS_PER_S  # fields 14 and 15 of proc(5)
    status = Path(f"/proc/{pid}/status").read_text()
    hwm_kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)
    return cpu_s, hwm_kib / 1024.0


class NodeProcesses:
    """Context manager: start the nodes, sample their usage every SAMPLE_PERIOD_S, stop them on exit."""

    def __init__(self, ros_args: list[str], domain_id: int, log_dir: Path, env: dict[str, str] | None = None) -> None:
        from bevplace_ros.nodes.runtime import use_large_cloud_profile

        self.env = dict(os.environ if env is None else env, ROS_DOMAIN_ID=str(domain_id))
        use_large_cloud_profile(self.env)
        self.ros_args, self.log_dir = ros_args, Path(log_dir)
        self.processes: dict[str, subprocess.Popen] = {}
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample_loop, name="node_usage", daemon=True)

    def __enter__(self) -> "NodeProcesses":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for name in NODE_NAMES:
                with (self.log_dir / f"{name}.log").open("w") as log:
                    self.processes[name] = subprocess.Popen([sys.executable, "-m", f"bevplace_ros.nodes.{name}", *self.ros_args],
                                                            env=self.env, stdout=log, stderr=subprocess.STDOUT)
        except BaseException:
            self.stop()
            raise
        self._sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        from bevplace_ros.nodes.runtime import stop_node_process

        self._stop.set()
        if self._sampler.is_alive():
            self._sampler.join()
        for process in self.processes.values():
            if process.poll() is None:
                stop_node_process(process, timeout_s=30.0)

    def check(self) -> None:
        """Raise, naming the node and showing its log's end, if a node process has exited."""
        for name, process in self.processes.items():
            if process.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text()[-3000:]
                raise RuntimeError(f"{name} exited with code {process.returncode}; its log ends:\n{tail}")

    def sample(self) -> Sample:
        cpu, rss = {}, {}
        for name, process in self.processes.items():
            try:
                cpu[name], rss[name] = read_usage(process.pid)
            except (FileNotFoundError, ProcessLookupError, ValueError):  # exited between poll and read
                continue
        reading = Sample(time.perf_counter(), cpu, rss)
        self.samples.append(reading)
        return reading

    def usage(self, start: float, end: float) -> dict[str, dict[str, float]]:
        """Per node: CPU in % of one core between two perf_counter times (nearest samples), CPU seconds after `end`
        (catching up once the input stopped), and the peak RSS seen."""
        if len(self.samples) < 2:
            return {}
        first = min(self.samples, key=lambda s: abs(s.wall - start))
        last = min(self.samples, key=lambda s: abs(s.wall - end))
        final = self.samples[-1]
        out = {}
        for name in self.processes:
            if name not in first.cpu_s or name not in last.cpu_s:
                continue
            span = max(last.wall - first.wall, 1e-9)
            out[name] = {
                "pid": self.processes[name].pid,
                "cpu_percent": round(100.0 * (last.cpu_s[name] - first.cpu_s[name]) / span, 1),
                "cpu_s": round(last.cpu_s[name] - first.cpu_s[name], 2),
                "cpu_s_after_input": round(final.cpu_s.get(name, last.cpu_s[name]) - last.cpu_s[name], 2),
                "peak_rss_mib": round(max(s.peak_rss_mib.get(name, 0.0) for s in self.samples), 1),
            }
        return out

    def _sample_loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(SAMPLE_PERIOD_S)
        self.sample()
