"""Replay a rosbag2 (sqlite3 or mcap) through the loop-closure nodes over the real middleware.

In-process mode runs the three nodes on one multi-threaded executor and replays in lock-step (each
scan waits for the pipeline to settle), so a run gives the same result at any machine speed; with
a rate it replays on the bag's clock instead. External mode only publishes and records, for nodes
started as separate processes; its lock-step waits on what the nodes publish (each scan's keyframe,
one closure per candidate, a path holding every keyframe), so it too never depends on timing.
Process mode starts the three nodes as separate processes, as the launch file does, and measures each one's
CPU and memory (node_processes.py) while the bag plays on its own clock: the real-time check.
In-process and process-mode runs use a DDS domain of their own, so no other ROS traffic on the machine mixes in.
Every output topic is recorded into a new rosbag2, and every wall time a real-time report needs (when each scan
went out, when each keyframe and loop closure came back, each node's latest /diagnostics) is kept.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

ODOM_BURST = 100  # lock-step replay waits for delivery after this many odometry messages (QoS depth 200)
DISCOVERY_S = 120.0  # generous: node processes import torch and load weights, slowly on a loaded machine
SCAN_TIMEOUT_S = 120.0  # external lock-step: the longest wait for a scan's keyframe
RESEND_S = 10.0  # external lock-step: re-send a scan (best effort) and its odometry when no keyframe came in this long
OUTPUT_TOPICS = {
    "keyframes": "bevplace_ros/msg/Keyframe",
    "loop_candidates": "bevplace_ros/msg/LoopCandidate",
    "loop_closures": "bevplace_ros/msg/LoopClosure",
    "pose_graph_edges": "bevplace_ros/msg/PoseGraphEdge",
    "loop_decisions": "bevplace_ros/msg/PoseGraphEdge",
    "optimized_path": "nav_msgs/msg/Path",
    "map_to_odom": "geometry_msgs/msg/TransformStamped",
    "loop_markers": "visualization_msgs/msg/MarkerArray",
}


@dataclass(frozen=True)
class ReplayOptions:
    bag: Path
    params_file: Path | None = None
    record: Path | None = None  # folder of the rosbag2 with every output; None records nothing
    rate: float = 0.0  # 0: lock-step, as fast as the pipeline allows; else a multiple of real time
    points_topic: str = "/points"
    odom_topic: str = "/odom"
    in_process: bool = True
    settle_s: float = 15.0  # external mode with a rate: quiet time that ends the run (lock-step waits on the outputs)
    max_scans: int = 0  # 0: all
    skip_scans: int = 0  # start after this many scans (odometry is still replayed from the start)
    load_map: Path | None = None  # folder written by save_map: the nodes continue that map
    save_map: Path | None = None  # folder for the nodes' state at the end
    overrides: tuple[str, ...] = ()  # extra "name:=value" parameters for every node
    progress: bool = True
    # None: in-process or processes, a domain private to this replay (other ROS traffic on the machine, another replay
    # say, would otherwise mix into the run); external, the environment's ROS_DOMAIN_ID, which the nodes share.
    domain_id: int | None = None
    processes: bool = False  # start the three nodes as separate processes, as the launch file does (needs in_process False)
    node_logs: Path | None = None  # processes: folder of the nodes' logs (default: beside `record`, else a temporary one)

    def __post_init__(self) -> None:
        if self.processes and self.in_process:
            raise ValueError("ReplayOptions: processes=True starts the nodes as processes; set in_process=False")


@dataclass
class ReplayRun:
    """What the nodes said, decoded; keyed by keyframe id."""

    keyframe_stamps: dict[int, int] = field(default_factory=dict)  # ns
    odometry: dict[int, np.ndarray] = field(default_factory=dict)  # T_odom_sensor
    closures: list[tuple[int, int, np.ndarray, bool, float]] = field(default_factory=list)  # query, match, T, verified, ms
    candidates: int = 0
    optimized: dict[int, np.ndarray] = field(default_factory=dict)  # T_map_sensor (in-process: the graph's, else the last path)
    scans_published: int = 0
    latency_ms: dict[str, list[float]] = field(default_factory=dict)
    # (query, match) the pose graph accepted: in-process from the graph, else from its loop_decisions (None: none came)
    graph_loops: set[tuple[int, int]] | None = None
    sessions: dict[int, int] = field(default_factory=dict)  # keyframe -> session, loaded keyframes too; in-process only
    map_poses: dict[int, np.ndarray] = field(default_factory=dict)  # T_map_k of every anchored graph keyframe; in-process only
    anchorings: dict[int, Any] = field(default_factory=dict)  # session -> pose_graph.Anchoring; in-process only
    wall_s: float = 0.0
    # wall times (time.perf_counter) for the real-time report
    scan_sent: dict[int, float] = field(default_factory=dict)  # scan header stamp ns -> when it was published
    keyframe_received: dict[int, float] = field(default_factory=dict)  # keyframe id -> when its message arrived
    closure_received: list[tuple[int, float, bool]] = field(default_factory=list)  # (query stamp ns, arrival, verified)
    topic_received: dict[str, list[float]] = field(default_factory=dict)  # output topic -> arrival of each message
    playback: tuple[float, float] = (0.0, 0.0)  # first and last message published
    diagnostics: dict[str, dict[str, str]] = field(default_factory=dict)  # node -> its latest /diagnostics values
    node_usage: dict[str, dict[str, float]] = field(default_factory=dict)  # processes: node -> CPU and memory
    unsettled: str = ""  # processes: the /diagnostics counter that never caught up (the report is then partial)


def replay(options: ReplayOptions) -> ReplayRun:
    from contextlib import nullcontext

    from bevplace_ros.nodes.bag_io import BagInput
    from bevplace_ros.nodes.node_processes import NodeProcesses
    from bevplace_ros.nodes.runtime import use_large_cloud_profile

    use_large_cloud_profile()  # LiDAR-size clouds must reach --external nodes too
    bag = BagInput(options.bag, options.points_topic, options.odom_topic)
    args = ["--ros-args"]
    if options.params_file:
        args += ["--params-file", str(options.params_file)]
    mount = bag.base_to_sensor()
    for item in (f"base_to_sensor:={list(map(float, mount))}", *options.overrides):
        args += ["-p", item]
    domain = replay_domain(options)
    remaps = ["-r", f"points:={options.points_topic}", "-r", f"odom:={options.odom_topic}", "-p", "use_sim_time:=false"]
    # as launch/bevplace.launch.py starts them: params file, remapped inputs, the large-cloud profile; stopped on any exit
    with NodeProcesses(args + remaps, domain, _node_log_dir(options)) if options.processes else nullcontext() as processes:
        run, nodes = _run(bag, args, domain, options, processes)
    if nodes:  # from the graph itself once nothing runs: the last recorded path may be one update behind
        graph = nodes[2].graph
        run.graph_loops = {(loop.query_key, loop.match_key) for loop in graph.loops()}
        run.sessions, run.map_poses, run.anchorings = graph.sessions(), graph.optimized_poses(), graph.anchorings()
        run.optimized = run.map_poses
        run.latency_ms = {"place_recognition": list(nodes[0].latency_ms), "registration": [c[4] for c in run.closures],
                          "pose_graph": list(nodes[2].latency_ms)}
    return run


def _run(bag, args: list[str], domain: int | None, options: ReplayOptions, processes) -> tuple[ReplayRun, list[Any]]:
    """Player, recorder (and in-process nodes) on one executor; the run and the in-process nodes, destroyed."""
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import MultiThreadedExecutor

    context = Context()
    rclpy.init(args=args, context=context, domain_id=domain)
    executor = MultiThreadedExecutor(num_threads=4, context=context)
    nodes = _start_nodes(context) if options.in_process else []
    player = rclpy.create_node("bag_replay", context=context)
    run = ReplayRun()
    recorder = _Recorder(player, options.record, run, bag)
    for node in [*nodes, player]:
        executor.add_node(node)
    spinner = _Spinner(executor, processes.check if processes else None)
    start = time.perf_counter()
    try:
        _play(bag, player, nodes, recorder, options, run, spinner)
        run.wall_s = time.perf_counter() - start
        if processes:
            try:
                _wait(lambda: not _diagnostics_unsettled(run), SETTLE_TIMEOUT_S, "the node processes to finish (their /diagnostics)", spinner)
            except TimeoutError as err:
                run.unsettled = f"{err}: {_diagnostics_unsettled(run)}"
                print(f"warning: {run.unsettled}; the report uses the counters as they stand", file=sys.stderr)
            recorder.await_fresh_diagnostics(spinner)
            processes.sample()
            run.node_usage = processes.usage(*run.playback)
    finally:
        executor.shutdown(timeout_sec=5.0)
        for node in nodes:
            node.destroy_node()
        recorder.close()
        player.destroy_node()
        context.try_shutdown()
    return run, nodes


def replay_domain(options: ReplayOptions) -> int | None:
    """The DDS domain of a replay: the chosen one, a private one for nodes it starts (from the pid), else the environment's."""
    if options.domain_id is not None or not (options.in_process or options.processes):
        return options.domain_id
    return 1 + os.getpid() % 100  # not 0, where ROS tools talk by default; within 0-101, where Fast DDS ports are safe on Linux


def _start_nodes(context) -> list[Any]:
    from bevplace_ros.nodes.place_recognition_node import PlaceRecognitionNode
    from bevplace_ros.nodes.pose_graph_node import PoseGraphNode
    from bevplace_ros.nodes.registration_node import RegistrationNode

    return [PlaceRecognitionNode(context=context), RegistrationNode(context=context), PoseGraphNode(context=context)]


def _node_log_dir(options: ReplayOptions) -> Path:
    import tempfile

    if options.node_logs is not None:
        return Path(options.node_logs)
    return Path(options.record).parent / "node_logs" if options.record else Path(tempfile.mkdtemp(prefix="bevplace_node_logs_"))


def _diagnostics_unsettled(run: ReplayRun) -> str:
    """What is still outstanding ("" when nothing): every scan the place node received handled or dropped, every candidate
    handled or dropped by registration, every keyframe taken by the pose graph (it can lag minutes behind the input on a
    busy machine)."""
    place, registration = run.diagnostics.get("/place_recognition_node"), run.diagnostics.get("/registration_node")
    graph = run.diagnostics.get("/pose_graph_node")
    if place is None or registration is None or graph is None:
        return "no /diagnostics yet from every node"

    def count(values: dict[str, str], *keys: str) -> int:
        """Sum of the counters named, or starting with a name ending in '.' (every dropped.* or shed.*)."""
        return sum(int(float(v)) for k, v in values.items() if k in keys or any(p.endswith(".") and k.startswith(p) for p in keys))

    checks = (("place node: scans handled + dropped", count(place, "handled", "dropped."), count(place, "received")),
              ("registration: candidates handled (answered, skipped or shed) + dropped", count(registration, "candidates", "dropped."),
               count(place, "candidates")),
              ("registration: keyframes", count(registration, "keyframes"), count(place, "keyframes")),
              ("pose graph: keyframes", count(graph, "keyframes_handled"), count(place, "keyframes")))
    return "; ".join(f"{what} {done} of {due}" for what, done, due in checks if done < due)


class _Spinner:
    """Spins the executor on a thread and keeps the first callback error, so waits end at once; `also_check` raises
    when something else the replay depends on failed (a node process that exited)."""

    def __init__(self, executor, also_check: Callable[[], None] | None = None) -> None:
        self.also_check = also_check
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._spin, args=(executor,), daemon=True)
        self._thread.start()

    def _spin(self, executor) -> None:
        try:
            executor.spin()
        except BaseException as err:
            self.error = err

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"a node callback failed: {type(self.error).__name__}: {self.error}") from self.error
        if self.also_check is not None:
            self.also_check()


def _play(bag, player, nodes, recorder, options: ReplayOptions, run: ReplayRun, spinner: _Spinner) -> None:
    from nav_msgs.msg import Odometry

    from bevplace_ros.nodes.bag_io import header_stamp_ns
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from sensor_msgs.msg import PointCloud2

    points = player.create_publisher(PointCloud2, options.points_topic, qos_profile_sensor_data)
    odom = player.create_publisher(Odometry, options.odom_topic, QoSProfile(depth=200, reliability=ReliabilityPolicy.RELIABLE))
    subscribers = [points, odom] if not nodes else [points]
    _wait(lambda: all(p.get_subscription_count() > 0 for p in subscribers), DISCOVERY_S, "nodes to subscribe to the bag topics", spinner)
    _wait(recorder.connected, DISCOVERY_S, "the recorder to match the nodes' publishers", spinner)
    if not nodes:
        _handshake(player, spinner)
    if options.load_map:
        _call_map_services(player, "load", options.load_map, spinner)
    available = max(bag.scan_count - options.skip_scans, 0)
    total = min(available, options.max_scans or available)
    seen = 0
    progress = _progress(total, options.progress)
    odom_sent = 0
    odom_since_scan: list[Any] = []  # re-sent with a lost scan in external lock-step
    wall0, bag0 = time.perf_counter(), None
    first_sent = None
    for kind, stamp_ns, raw in bag.messages_lidar_after_odometry():
        if kind == "points":
            seen += 1
            if seen <= options.skip_scans:
                continue
            if run.scans_published >= total:
                break
        if options.rate > 0:
            bag0 = stamp_ns if bag0 is None else bag0
            delay = (stamp_ns - bag0) * 1e-9 / options.rate - (time.perf_counter() - wall0)
            time.sleep(max(delay, 0.0))
        recorder.now_ns = stamp_ns
        first_sent = time.perf_counter() if first_sent is None else first_sent
        if kind == "odom":
            odom.publish(raw)
            odom_since_scan.append(raw)
            odom_sent += 1
            if nodes and options.rate <= 0 and odom_sent % ODOM_BURST == 0:  # stay inside the QoS history depth
                _wait(lambda: nodes[0].odometry_received >= odom_sent, 30.0, "odometry to reach place_recognition_node", spinner)
            continue
        if nodes and options.rate <= 0:
            _wait(lambda: nodes[0].odometry_received >= odom_sent, 30.0, "odometry to reach place_recognition_node", spinner)
        points.publish(raw)
        run.scan_sent[header_stamp_ns(raw)] = time.perf_counter()
        run.scans_published += 1
        progress(run)
        if nodes and options.rate <= 0:
            _wait(lambda: nodes[0].clouds_handled >= run.scans_published, 120.0, "place_recognition_node to handle the scan", spinner)
            _wait(lambda: _settled(nodes, recorder), 300.0, "registration and the pose graph to settle", spinner)
        elif options.rate <= 0:
            resend = [(odom, m) for m in odom_since_scan] + [(points, raw)]
            _await_keyframe(run.scans_published, lambda: [publisher.publish(m) for publisher, m in resend], recorder, spinner)
            _wait(recorder.closures_caught_up, 300.0, "registration_node to answer every loop candidate", spinner)
        odom_since_scan.clear()
    run.playback = (first_sent or time.perf_counter(), time.perf_counter())
    if nodes:
        _wait(lambda: nodes[0].idle() and _settled(nodes, recorder), 600.0, "the pipeline to finish", spinner)
    elif options.rate <= 0:
        _wait(lambda: recorder.closures_caught_up() and recorder.path_complete(), 600.0, "the pipeline to finish", spinner)
    else:
        recorder.wait_quiet(options.settle_s)
    progress(None)
    if options.save_map:
        _call_map_services(player, "save", options.save_map, spinner)


# (node, service suffix, file) of each node's state in a map folder
MAP_FILES = (("place_recognition_node", "map", "place_map.npz"), ("registration_node", "keyframes", "keyframes.npz"),
             ("pose_graph_node", "graph", "graph.npz"))


def _call_map_services(player, verb: str, folder: Path, spinner: "_Spinner") -> None:
    """Save or load every node's state through its services, over the middleware like any client."""
    from bevplace_ros.srv import LoadMap, SaveMap

    srv_type = SaveMap if verb == "save" else LoadMap
    Path(folder).mkdir(parents=True, exist_ok=True)
    for node, suffix, filename in MAP_FILES:
        client = player.create_client(srv_type, f"/{node}/{verb}_{suffix}")
        _wait(lambda: client.service_is_ready(), 30.0, f"service /{node}/{verb}_{suffix}", spinner)
        future = client.call_async(srv_type.Request(path=str(Path(folder) / filename)))
        _wait(future.done, 120.0, f"/{node}/{verb}_{suffix} to answer", spinner)
        response = future.result()
        player.destroy_client(client)
        if not response.success:
            raise RuntimeError(f"/{node}/{verb}_{suffix}: {response.message}")


def _handshake(player, spinner: "_Spinner") -> None:
    """External mode: a parameter-service round trip with each node. Discovery is per side: our reader can match a
    node's writer before that writer matches our reader, and what it publishes meanwhile is lost. An answer shows
    the node has taken in this process's endpoints announced before the client (recorder, bag publishers)."""
    from rcl_interfaces.srv import GetParameters

    for node, _, _ in MAP_FILES:
        client = player.create_client(GetParameters, f"/{node}/get_parameters")
        _wait(client.service_is_ready, DISCOVERY_S, f"service /{node}/get_parameters", spinner)
        future = client.call_async(GetParameters.Request(names=["use_sim_time"]))
        _wait(future.done, DISCOVERY_S, f"/{node}/get_parameters to answer", spinner)
        player.destroy_client(client)


def _settled(nodes, recorder) -> bool:
    place, registration, graph = nodes
    return (
        registration.keyframes_handled >= place.keyframes_published
        and registration.worker.handled + registration.worker.dropped >= place.candidates_published
        and registration.idle()
        and graph.keyframes_handled >= place.keyframes_published
        and graph.loops_handled >= registration.closures_published
        and recorder.count("keyframes") >= place.keyframes_published
        and recorder.count("loop_closures") >= registration.closures_published
    )


def _await_keyframe(count: int, resend: Callable[[], Any], recorder: "_Recorder", spinner: _Spinner) -> None:
    """External lock-step: until the recorder holds `count` keyframes. Scans are best effort (sensor-data QoS) and a
    just-matched subscription can miss the first messages, so the scan and its odometry are re-sent while none comes;
    the node skips a copy of a scan or odometry it already took (its stamp is not after the last)."""
    deadline = time.monotonic() + SCAN_TIMEOUT_S
    resend_at = time.monotonic() + RESEND_S
    while recorder.count("keyframes") < count:
        spinner.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"replay: no keyframe for scan {count} in {SCAN_TIMEOUT_S:.0f} s (external lock-step needs every "
                               "scan to become a keyframe; replay with a rate otherwise)")
        if time.monotonic() > resend_at:
            resend()
            resend_at = time.monotonic() + RESEND_S
        time.sleep(0.002)


SETTLE_TIMEOUT_S = 600.0  # processes: how long the nodes may take to work off their queues after the input ends


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str, spinner: _Spinner) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        spinner.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"replay: gave up waiting {timeout_s:.0f} s for {what}")
        time.sleep(0.002)


def _progress(total: int, enabled: bool) -> Callable[[ReplayRun | None], None]:
    if not enabled:
        return lambda run: None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="scan", desc="replay", dynamic_ncols=True)

    def update(run: ReplayRun | None) -> None:
        if run is None:
            bar.close()
            return
        bar.n = run.scans_published
        bar.set_postfix(keyframes=len(run.keyframe_stamps), loops=sum(1 for c in run.closures if c[3]), refresh=False)
        bar.refresh()

    return update


class _Recorder:
    """Records every output topic as raw CDR into a rosbag2 and decodes what the report needs."""

    def __init__(self, node, path: Path | None, run: ReplayRun, bag) -> None:
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

        from bevplace_ros.nodes.interfaces import message_class

        self.run = run
        self.now_ns = 0
        self._lock = threading.Lock()
        self._counts = {topic: 0 for topic in OUTPUT_TOPICS}
        self._last = time.monotonic()
        self._writer = bag.open_writer(path, OUTPUT_TOPICS) if path else None
        self._subscriptions = []
        for topic, msgtype in OUTPUT_TOPICS.items():
            latched = topic in ("optimized_path", "map_to_odom", "loop_markers")
            qos = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)
            cls = message_class(msgtype)
            self._subscriptions.append(node.create_subscription(cls, topic, self._callback(topic, cls), qos, raw=True))
        from diagnostic_msgs.msg import DiagnosticArray

        self._diagnostics_seen: dict[str, int] = {}  # node -> statuses received
        node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 50)

    def connected(self) -> bool:
        return all(s.get_publisher_count() > 0 for s in self._subscriptions if s.topic_name.lstrip("/") in ("keyframes", "loop_closures"))

    def count(self, topic: str) -> int:
        with self._lock:
            return self._counts[topic]

    def closures_caught_up(self) -> bool:
        """registration_node publishes one closure (verified or not) per candidate."""
        with self._lock:
            return self._counts["loop_closures"] >= self._counts["loop_candidates"]

    def path_complete(self) -> bool:
        """The latest optimised path holds every keyframe."""
        with self._lock:
            return set(self.run.keyframe_stamps) <= set(self.run.optimized)

    def await_fresh_diagnostics(self, spinner: "_Spinner", statuses: int = 2, timeout_s: float = 30.0) -> None:
        """Until every node that reported has sent `statuses` more (1 Hz), so the counters kept are the final ones."""
        with self._lock:
            target = {name: seen + statuses for name, seen in self._diagnostics_seen.items()}

        def fresh() -> bool:
            with self._lock:
                return all(self._diagnostics_seen[name] >= n for name, n in target.items())

        _wait(fresh, timeout_s, "fresh /diagnostics from every node", spinner)

    def _on_diagnostics(self, msg) -> None:
        from bevplace_ros.nodes.diagnostics import status_values

        with self._lock:
            for status in msg.status:
                self.run.diagnostics[status.name] = status_values(status)
                self._diagnostics_seen[status.name] = self._diagnostics_seen.get(status.name, 0) + 1

    def wait_quiet(self, quiet_s: float) -> None:
        while time.monotonic() - self._last < quiet_s:
            time.sleep(0.1)

    def _callback(self, topic: str, cls) -> Callable[[bytes], None]:
        from rclpy.serialization import deserialize_message

        from bevplace_ros.nodes.conversions import stamp_to_ns

        def record(raw: bytes) -> None:
            msg = deserialize_message(raw, cls)
            arrived = time.perf_counter()
            with self._lock:
                self.run.topic_received.setdefault(topic, []).append(arrived)
                if topic == "keyframes":
                    self.run.keyframe_received[int(msg.id)] = arrived
                elif topic == "loop_closures":
                    self.run.closure_received.append((stamp_to_ns(msg.query_stamp), arrived, bool(msg.verified)))
                if self._writer is not None:
                    self._writer.write(topic, self.now_ns, raw)
                self._decode(topic, msg)
                self._counts[topic] += 1
                self._last = time.monotonic()

        return record

    def _decode(self, topic: str, msg) -> None:
        from bevplace_ros.nodes.conversions import pose_to_matrix, stamp_to_ns

        run = self.run
        if topic == "keyframes":
            run.keyframe_stamps[int(msg.id)] = stamp_to_ns(msg.header.stamp)
            run.odometry[int(msg.id)] = pose_to_matrix(msg.odom_pose.pose)
        elif topic == "loop_candidates":
            run.candidates += 1
        elif topic == "loop_decisions":
            taken = {(int(msg.key_to), int(msg.key_from))} if msg.type == msg.LOOPCLOSE else set()
            run.graph_loops = (run.graph_loops or set()) | taken
        elif topic == "loop_closures":
            run.closures.append((int(msg.query_id), int(msg.match_id), pose_to_matrix(msg.relative_pose.pose), bool(msg.verified), float(msg.latency_ms)))
        elif topic == "optimized_path":
            # The graph keeps stamps as float seconds (sub-microsecond exact), so match to the millisecond.
            by_ms = {round(ns * 1e-6): key for key, ns in run.keyframe_stamps.items()}
            run.optimized = {by_ms[ms]: pose_to_matrix(p.pose) for p in msg.poses if (ms := round(stamp_to_ns(p.header.stamp) * 1e-6)) in by_ms}

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
