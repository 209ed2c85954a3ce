"""Multi-session mapping: a second run in its own odometry frame joins a saved map only after two
agreeing loops, survives a wrong first loop, and a two-session map saves and loads whole."""

from __future__ import annotations

import numpy as np
import pytest
from test_pose_graph import Scenario, _exp, _loop_cov, make_scenario

from bevplace_ros.descriptor_db import DatabaseConfig, DescriptorDatabase
from bevplace_ros.pose_graph import FORMAT_NAME, PoseGraph, PoseGraphConfig
from bevplace_ros.se3 import invert, rotation_error_deg, translation_error
from bevplace_ros.versioned_npz import save_versioned_npz

LAP = 100  # keyframes per lap of make_scenario(side=20)
START = 130  # the second run starts here, on the map's second lap (inside the mapped part)
OFFSET = 1000  # the second run's keyframe ids continue after a gap, as the place node's do after a load
# The second run's odometry frame: anywhere, turned any way.
T_ODOM1_ODOM0 = _exp([0.0, 0.0, 2.0], [50.0, -20.0, 0.0])


@pytest.fixture(scope="module")
def sc() -> Scenario:
    return make_scenario(seed=3, laps=2, side=20)


def _map(sc: Scenario, cfg: PoseGraphConfig = PoseGraphConfig()) -> PoseGraph:
    """Session 0: one lap, no loops (so the map is the drifting odometry, and predictions are exact)."""
    graph = PoseGraph(cfg)
    for k in range(LAP):
        graph.add_keyframe(k, 0.1 * k, sc.odom[k])
    return graph


def _second_run(sc: Scenario, graph: PoseGraph, upto: int) -> None:
    """The second run's keyframes after those already added, up to upto-1, in their own odometry frame."""
    for k in range(max(START, max(graph.keys) - OFFSET + 1), upto):
        graph.add_keyframe(OFFSET + k, 0.1 * (k - START), T_ODOM1_ODOM0 @ invert(sc.odom[START]) @ sc.odom[k])


def _true_loop(sc: Scenario, k: int) -> tuple[int, int, np.ndarray]:
    """Loop from run-1 keyframe k to its first-lap twin: (match, query, T_match_query)."""
    j = k - LAP
    return j, OFFSET + k, invert(sc.gt[j]) @ sc.gt[k]


def _predicted(graph: PoseGraph, j: int, T_ji: np.ndarray) -> np.ndarray:
    """Where the loop puts its query keyframe in the map frame."""
    return graph.optimized_poses()[j] @ T_ji


def test_second_run_joins_only_after_two_agreeing_loops(sc: Scenario) -> None:
    graph = _map(sc)
    assert graph.localized and graph.map_to_odom() is not None
    assert graph.start_session() == 1 and not graph.localized
    _second_run(sc, graph, START + 10)
    assert graph.map_to_odom() is None and set(graph.optimized_poses()) == set(range(LAP))
    # An intra-session loop of the unanchored run is held, not lost.
    intra = graph.add_loop(OFFSET + START, OFFSET + START + 9, invert(sc.gt[START]) @ sc.gt[START + 9], _loop_cov())
    assert intra.accepted and "held until session 1 is anchored" in intra.reason
    first = graph.add_loop(*_true_loop(sc, START + 2), _loop_cov())
    assert first.held and not first.accepted and not graph.localized and graph.map_to_odom() is None
    # A second loop from the same query keyframe is not independent evidence.
    j = START + 2 - LAP - 1
    same_query = graph.add_loop(j, OFFSET + START + 2, invert(sc.gt[j]) @ sc.gt[START + 2], _loop_cov())
    assert same_query.held and "1 of 2 agreeing query keyframes" in same_query.reason and not graph.localized
    second = graph.add_loop(*_true_loop(sc, START + 8), _loop_cov())
    assert second.accepted and "session 1 anchored by loops from keyframes" in second.reason
    assert graph.localized and graph.anchorings()[1].query_keys == (OFFSET + START + 2, OFFSET + START + 2, OFFSET + START + 8)
    poses = graph.optimized_poses()
    assert all(OFFSET + k in poses for k in range(START, START + 10))
    j, i, T_ji = _true_loop(sc, START + 8)
    assert translation_error(poses[i], _predicted(graph, j, T_ji)) < 0.3
    assert len(graph.loops()) == 4  # the held intra-session loop and the three anchoring loops
    # map->odom of the live run maps its odometry onto its optimised poses.
    _second_run(sc, graph, START + 20)
    latest = OFFSET + START + 19
    T_odom1 = T_ODOM1_ODOM0 @ invert(sc.odom[START]) @ sc.odom[START + 19]
    assert np.allclose(graph.map_to_odom() @ T_odom1, graph.optimized_poses()[latest], atol=1e-9)
    # Later inter-session loops go through the usual gate: a loop 30 m off is refused.
    j, i, T_ji = _true_loop(sc, START + 15)
    assert not graph.add_loop(j, i, T_ji @ _exp(np.zeros(3), [30.0, 0, 0]), _loop_cov()).accepted
    assert graph.add_loop(j, i, T_ji, _loop_cov()).accepted


def test_wrong_first_loop_never_anchors_and_is_dropped(sc: Scenario) -> None:
    graph = _map(sc)
    graph.start_session()
    _second_run(sc, graph, START + 12)
    rng = np.random.default_rng(5)
    # Perceptual aliasing: several confident loops to wrong places, none agreeing with another.
    for k in range(START, START + 4):
        T_wrong = _exp([0, 0, rng.uniform(-np.pi, np.pi)], np.r_[rng.uniform(-15, 15, 2), 0.0])
        decision = graph.add_loop(int(rng.integers(0, LAP)), OFFSET + k, T_wrong, _loop_cov())
        assert decision.held and not graph.localized and graph.map_to_odom() is None
    # Two true loops anchor the run; the wrong hypotheses are dropped, not averaged in.
    assert graph.add_loop(*_true_loop(sc, START + 6), _loop_cov()).held
    decision = graph.add_loop(*_true_loop(sc, START + 10), _loop_cov())
    assert decision.accepted and "4 disagreeing hypotheses dropped" in decision.reason
    poses = graph.optimized_poses()
    for k in range(START, START + 12):
        j, i, T_ji = _true_loop(sc, k)
        assert translation_error(poses[i], _predicted(graph, j, T_ji)) < 0.3
        assert rotation_error_deg(poses[i], _predicted(graph, j, T_ji)) < 0.5
    assert {lp.query_key for lp in graph.loops()} == {OFFSET + START + 6, OFFSET + START + 10}


def test_one_loop_anchoring_is_a_setting(sc: Scenario) -> None:
    graph = _map(sc, PoseGraphConfig(anchor_loops=1))
    graph.start_session()
    _second_run(sc, graph, START + 3)
    assert graph.add_loop(*_true_loop(sc, START + 1), _loop_cov()).accepted and graph.localized


def _two_session_graph(sc: Scenario) -> PoseGraph:
    graph = _map(sc)
    graph.start_session()
    _second_run(sc, graph, START + 25)
    for k in (START + 3, START + 9, START + 20):
        graph.add_loop(*_true_loop(sc, k), _loop_cov())
    return graph


def test_two_session_map_saves_and_loads_whole(sc: Scenario, tmp_path) -> None:
    graph = _two_session_graph(sc)
    loaded = PoseGraph.load(graph.save(tmp_path / "graph.npz"))
    assert loaded.sessions() == graph.sessions() and set(loaded.sessions().values()) == {0, 1}
    a, b = graph.optimized_poses(), loaded.optimized_poses()
    assert a.keys() == b.keys() and max(np.abs(a[k] - b[k]).max() for k in a) < 1e-9
    assert loaded.anchorings()[1].query_keys == graph.anchorings()[1].query_keys
    assert loaded.localized and np.allclose(loaded.map_to_odom(), graph.map_to_odom(), atol=1e-9)
    # Continuing: a third run starts unanchored, with keys after the saved ones.
    assert loaded.start_session() == 2 and not loaded.localized and loaded.map_to_odom() is None
    loaded.add_keyframe(OFFSET + 500, 0.0, np.eye(4))
    assert loaded.status() == {"session": 2, "sessions": 3, "localized": False, "keyframes": LAP + 25 + 1,
                               "loops": len(graph.loops()), "pending_anchor_loops": 0}


def test_unanchored_run_saves_with_its_pending_loop(sc: Scenario, tmp_path) -> None:
    graph = _map(sc)
    graph.start_session()
    _second_run(sc, graph, START + 10)
    assert graph.add_loop(*_true_loop(sc, START + 2), _loop_cov()).held
    loaded = PoseGraph.load(graph.save(tmp_path / "graph.npz"))
    assert not loaded.localized and loaded.status()["pending_anchor_loops"] == 1
    # The saved pending hypothesis still counts: one more agreeing loop anchors the run.
    assert loaded.add_loop(*_true_loop(sc, START + 8), _loop_cov()).accepted and loaded.localized


def test_previous_release_graph_file_loads_as_one_session(sc: Scenario, tmp_path) -> None:
    """A version 1 file (today's release: no sessions) is exactly a version 2 file without `sessions`."""
    graph = make_scenario_graph(sc)
    with np.load(graph.save(tmp_path / "v2.npz")) as npz:
        fields = {name: npz[name] for name in npz.files if name not in ("format", "version", "sessions")}
    old = save_versioned_npz(tmp_path / "v1.npz", FORMAT_NAME, 1, fields)
    loaded = PoseGraph.load(old)
    assert set(loaded.sessions().values()) == {0} and loaded.localized
    a, b = graph.optimized_poses(), loaded.optimized_poses()
    assert max(np.abs(a[k] - b[k]).max() for k in a) < 1e-9 and len(loaded.loops()) == len(graph.loops()) > 0


def make_scenario_graph(sc: Scenario) -> PoseGraph:
    """One session over both laps with its loops, as the released code built it."""
    graph = PoseGraph()
    for k in range(len(sc.gt)):
        graph.add_keyframe(k, 0.1 * k, sc.odom[k])
        if k in sc.true_loops:
            j, T = sc.true_loops[k]
            graph.add_loop(j, k, T, _loop_cov())
    return graph


def test_database_recency_window_stays_within_a_session() -> None:
    rng = np.random.default_rng(0)
    desc = rng.normal(size=(60, 16)).astype(np.float32)
    db = DescriptorDatabase(DatabaseConfig(dim=16))
    db.add_batch(np.arange(50), np.arange(50.0), desc[:50], session=0)
    db.add_batch(np.arange(100, 105), np.arange(5.0), desc[50:55], session=1)
    # A run-1 keyframe at stamp 3 s looking like map keyframe 49 (added 5 keyframes ago, 46 s away
    # on another day's clock): found, though the window would hide it within one session.
    found = db.query(desc[49], stamp=3.0, k=1, exclude_recent=50, exclude_seconds=10.0, session=1)
    assert [(m.keyframe_id, m.session) for m in found] == [(49, 0)]
    # Its own session's recent keyframes stay hidden, whichever session asks.
    assert {m.session for m in db.query(desc[52], stamp=3.0, k=5, exclude_recent=50, exclude_seconds=10.0, session=1)} == {0}
    assert {m.session for m in db.query(desc[49], stamp=3.0, k=5, exclude_recent=50, exclude_seconds=10.0, session=0)} == {1}
    loaded = DescriptorDatabase.from_bytes(db.to_bytes(), "mem")
    assert np.array_equal(loaded.sessions, db.sessions) and loaded.next_session() == 2


def test_previous_release_database_loads_as_one_session() -> None:
    """Version 1 database blobs (ids, stamps, index; no sessions) still load."""
    import json
    import struct
    import zlib

    from bevplace_ros.descriptor_db import _HEADER, MAGIC

    rng = np.random.default_rng(1)
    db = DescriptorDatabase(DatabaseConfig(dim=8))
    db.add_batch(np.arange(4), np.arange(4.0), rng.normal(size=(4, 8)))
    blob = db.to_bytes()
    meta_len = struct.unpack_from("<8sII", blob)[2]
    meta = json.loads(blob[_HEADER.size:_HEADER.size + meta_len])
    payload = blob[_HEADER.size + meta_len:]
    v1_payload = payload[:16 * 4] + payload[24 * 4:]
    meta["crc32"] = zlib.crc32(v1_payload)
    meta_bytes = json.dumps(meta, sort_keys=True).encode()
    old = DescriptorDatabase.from_bytes(_HEADER.pack(MAGIC, 1, len(meta_bytes)) + meta_bytes + v1_payload, "v1")
    assert np.array_equal(old.ids, db.ids) and np.array_equal(old.sessions, np.zeros(4)) and old.next_session() == 1


def test_node_publishes_map_to_odom_only_once_the_loaded_maps_new_session_is_anchored(sc: Scenario, ros_context, tmp_path) -> None:
    """pose_graph_node over the real middleware: load a map, feed a new run's keyframes and loops."""
    from geometry_msgs.msg import TransformStamped
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from ros_helpers import pose_graph_with_client, spin_until
    from std_msgs.msg import Bool

    from bevplace_ros.msg import Keyframe, LoopClosure
    from bevplace_ros.nodes.conversions import ns_to_stamp, pose_with_covariance
    from bevplace_ros.nodes.qos import KEYFRAMES_QOS
    from bevplace_ros.srv import LoadMap

    map_file = _map(sc).save(tmp_path / "graph.npz")
    node, client_node, executor = pose_graph_with_client(ros_context, "session_test")
    namespace = client_node.get_namespace()
    localized: list[bool] = []
    corrections: list[TransformStamped] = []
    received = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    client_node.create_subscription(Bool, "localized", lambda m: localized.append(m.data), received)
    client_node.create_subscription(TransformStamped, "map_to_odom", corrections.append, received)
    reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
    keyframes = client_node.create_publisher(Keyframe, "keyframes", KEYFRAMES_QOS)  # the place node's QoS: the subscriber asks for transient local
    loops = client_node.create_publisher(LoopClosure, "loop_closures", reliable)
    try:
        client = client_node.create_client(LoadMap, f"{namespace}/pose_graph_node/load_graph")
        assert spin_until(executor, client.service_is_ready, 30.0)
        future = client.call_async(LoadMap.Request(path=str(map_file)))
        assert spin_until(executor, future.done, 30.0) and future.result().success, future.result()
        assert "session 1, not localised" in future.result().message
        assert spin_until(executor, lambda: localized and localized[-1] is False, 30.0)
        assert spin_until(executor, lambda: keyframes.get_subscription_count() and loops.get_subscription_count(), 30.0)
        for k in range(START, START + 10):
            T = T_ODOM1_ODOM0 @ invert(sc.odom[START]) @ sc.odom[k]
            keyframes.publish(Keyframe(header=_header(ns_to_stamp(k * 10**8)), id=OFFSET + k, odom_pose=pose_with_covariance(T, np.zeros((6, 6)))))
        assert spin_until(executor, lambda: node.keyframes_handled == 10, 30.0)
        assert corrections == [] and node.status()["localized"] is False
        for n, k in enumerate((START + 2, START + 8)):
            j, i, T_ji = _true_loop(sc, k)
            loops.publish(LoopClosure(header=_header(ns_to_stamp((n + 1) * 10**9)), query_id=i, match_id=j, verified=True,
                                      relative_pose=pose_with_covariance(T_ji, _loop_cov())))
            assert spin_until(executor, lambda: node.loops_handled == n + 1, 30.0)
        assert spin_until(executor, lambda: corrections and localized[-1] is True, 30.0)
        # The only map->odom came from the second loop: neither keyframes nor the first loop alone published one.
        assert {c.header.stamp.sec for c in corrections} == {2}
        assert node.status()["localized"] is True and node.status()["session"] == 1
    finally:
        executor.shutdown()
        node.destroy_node()
        client_node.destroy_node()


def _header(stamp):
    from std_msgs.msg import Header

    return Header(stamp=stamp, frame_id="odom")


@pytest.mark.slow
def test_replay_continues_a_saved_map_in_a_new_session_and_saves_both(drive, tmp_path, capsys) -> None:
    """`replay --save-map`, then `replay --load-map A --save-map B` on the rest of the drive (same
    odometry frame, but the graph may not assume it): run two joins the map, B holds both sessions."""
    from bevplace_ros.cli import main

    first = ["replay", str(drive), "--max-scans", "40", "--save-map", str(tmp_path / "a"), "--out", str(tmp_path / "out1"), "--no-progress"]
    assert main(first) == 0
    second = ["replay", str(drive), "--skip-scans", "40", "--load-map", str(tmp_path / "a"), "--save-map", str(tmp_path / "b"),
              "--out", str(tmp_path / "out2"), "--no-progress"]
    assert main(second) == 0
    printed = capsys.readouterr().out
    assert "session 0: keyframes 0..39 (40), defines the map frame" in printed
    assert "session 1: keyframes 40.." in printed and "anchored by loops from keyframes" in printed
    assert len(list((tmp_path / "out2").glob("run-*/sessions.png"))) == 1
    both = PoseGraph.load(tmp_path / "b" / "graph.npz")
    assert set(both.sessions().values()) == {0, 1} and both.anchored(1) and both.localized
    assert set(both.optimized_poses()) == set(both.keys)


def test_session_metrics_measure_the_anchor_against_ground_truth() -> None:
    """evaluate sessions' figures on a made-up run: 5 map keyframes, a run of 4 anchored at its
    third keyframe by an anchor 1 m and 2 degrees off, then optimised onto the truth."""
    from bevplace_ros.evaluation.sessions import session_metrics
    from bevplace_ros.nodes.bag_replay import ReplayRun
    from bevplace_ros.pose_graph import Anchoring

    T_map_world = _exp([0, 0, 0.3], [5.0, -2.0, 0.0])
    gt_world = {10 + i: _exp([0, 0, 0.1 * i], [60.0 + 4.0 * i, 0.0, 0.0]) for i in range(4)}  # starts 50 m past the map
    T_odom_world = _exp([0, 0, -1.0], [3.0, 4.0, 0.0])  # the run's own odometry frame, no drift
    true_anchor = T_map_world @ invert(T_odom_world)
    anchor = _exp([0, 0, np.radians(2.0)], [1.0, 0.0, 0.0]) @ true_anchor
    run = ReplayRun(keyframe_stamps={k: (k - 10) * 10**9 for k in gt_world}, odometry={k: T_odom_world @ T for k, T in gt_world.items()},
                    sessions={**{k: 0 for k in range(5)}, **{k: 1 for k in gt_world}},
                    map_poses={k: T_map_world @ T for k, T in gt_world.items()},
                    anchorings={1: Anchoring(1, (11, 12), 5 + 3, anchor, 1)})
    map_positions = np.array([[float(x), 0.0, 0.0] for x in range(0, 10, 2)])
    m = session_metrics(run, gt_world, T_map_world, map_positions)
    assert m["starts_outside_map"] and m["start_distance_to_map_m"] == pytest.approx(52.0)
    assert m["relocalised"] and m["anchor_keyframe"] == 2 and m["wrong_hypotheses_dropped"] == 1
    assert m["distance_before_m"] == pytest.approx(8.0) and m["time_before_s"] == pytest.approx(2.0)
    assert m["anchor_error_deg"] == pytest.approx(2.0, abs=1e-6) and 0.5 < m["anchor_error_m"] < 4.0
    assert not m["false_anchoring"] and m["ate_anchor_only_m"] > 0.5 and m["ate_joined_m"] == pytest.approx(0.0, abs=1e-9)
