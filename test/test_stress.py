"""Small versions of `bevplace-ros stress`: fuzzed input, wrong loops, bounded memory, crash-safe saves,
plus the second geometric check and wrong configuration at start-up."""

from __future__ import annotations


import numpy as np
import pytest
from rclpy.parameter import Parameter

from bevplace_ros.keyframe_store import KeyframeStoreConfig
from bevplace_ros.loop_verifier import LoopVerifier, LoopVerifierConfig
from bevplace_ros.nodes.parameters import InvalidParameter
from bevplace_ros.registration import RegistrationConfig
from bevplace_ros.se3 import invert, xyyaw_to_matrix
from bevplace_ros.stress.repetitive_world import CorridorConfig, corridor_drive


@pytest.fixture(scope="module")
def drive():
    return corridor_drive(CorridorConfig(beams=32))


def _scans(drive):
    return lambda i: np.c_[drive.scan(i % len(drive)), np.zeros(len(drive.scan(i % len(drive))))].astype(np.float32)


def test_fuzzed_messages_never_stop_the_nodes_or_the_good_scans(drive):
    from bevplace_ros.stress.fuzz_clouds import CLOUD_KINDS, OTHER_KINDS, FuzzConfig, run_fuzz

    report = run_fuzz(FuzzConfig(bad_messages=len(CLOUD_KINDS) + len(OTHER_KINDS) + 14, good_every=10, huge_clouds=0), _scans(drive), ())
    assert set(report.per_kind) == {*CLOUD_KINDS, *OTHER_KINDS}
    assert report.nodes_alive == 3
    assert report.good_processed == report.good_sent >= 5
    for reason in ("malformed", "too few points", "stamp", "frame", "no odometry"):
        assert report.skipped.get(reason, 0) >= 1, (reason, report.skipped)
    assert "error" not in report.skipped, report.skip_details  # every bad input has a named reason, not an unexpected exception


def test_big_endian_cloud_decodes_to_the_same_points(drive):
    from bevplace_ros.pointcloud2 import xyz_intensity
    from bevplace_ros.stress.fuzz_clouds import bad_cloud

    good = _scans(drive)(0)
    decoded = xyz_intensity(bad_cloud("big_endian", good, 1, 0, np.random.default_rng(0)))
    np.testing.assert_array_equal(decoded[:, :3], good[:, :3])


def test_identical_places_fool_registration_but_not_the_graph(drive):
    """Repetitive street: registration accepts a place one period away; the graph keeps ATE within 5 %."""
    from bevplace_ros.stress.false_loops import FalseLoopConfig, run_false_loops

    report, outcomes = run_false_loops(FalseLoopConfig(true_candidates=5, false_share=0.5), {"use_network": False})
    assert report.false_injected >= 0.1 * (report.false_injected + report.true_candidates)
    assert report.false_passing_registration >= 1, "the repetitive world must fool registration alone, or it tests nothing"
    assert report.graph["clean"]["false_loops"] == 0 and report.graph["clean"]["true_loops"] >= 3
    assert report.graph["full pipeline"]["false_loops"] == 0 or abs(report.ate_change()) <= 0.05, report
    assert report.graph["clean"]["ate_m"] < 0.5 * report.ate_odometry_m


def test_second_check_rejects_a_wall_only_alignment_and_a_bev_disagreement(drive):
    verifier = LoopVerifier(LoopVerifierConfig(), RegistrationConfig(use_network=False), KeyframeStoreConfig())
    for key in (0, 1):
        verifier.add_keyframe(key, drive.scan(key))
    T_true = invert(drive.gt[0]) @ drive.gt[1]
    assert verifier.second_check(T_true, 1, 0) == ""
    shifted = T_true @ xyyaw_to_matrix(0.0, 0.0, np.radians(90.0))  # a wrong yaw: most sectors land on nothing
    assert verifier.second_check(shifted, 1, 0).startswith("region overlap")
    guess = T_true @ xyyaw_to_matrix(6.0, 0.0, 0.0)
    assert verifier.second_check(T_true, 1, 0, guess, bev_inliers=50).startswith("BEV disagreement")
    assert verifier.second_check(T_true, 1, 0, guess, bev_inliers=2) == "", "a weak BEV guess is not evidence"


def test_memory_stays_within_the_configured_bounds(drive):
    from bevplace_ros.stress.long_run import LongRunConfig, run_long

    cfg = LongRunConfig(keyframes=600, max_database=100, bev_in_memory=50, clouds_in_memory=30, clouds_on_disk=60, sample_every=50,
                        descriptor_dim=1024)
    report = run_long(cfg, lambda k: drive.scan(k % 5))
    assert report.database_max <= 100 and report.bev_in_memory_max == 50
    assert report.clouds_in_memory_max == 30 and report.clouds_on_disk_max == 60
    assert report.graph_keyframes == 600
    assert abs(report.slope(cfg.warmup_share)[1]) < 0.10, report.samples
    assert 0 < report.graph_kib_per_keyframe(cfg.warmup_share) < cfg.graph_kib_per_keyframe, report.graph_samples


def test_pose_graph_survives_a_long_loop_free_chain():
    """Cholesky threw IndeterminateSystemException ~5 km into a loop-free drive; QR does not."""
    from bevplace_ros.pose_graph import PoseGraph

    graph = PoseGraph()
    for key in range(1500):
        graph.add_keyframe(key, float(key), xyyaw_to_matrix(4.0 * key, 0.0, 0.0))
    assert len(graph.optimized_poses()) == 1500


def test_sigkill_during_saves_always_leaves_a_loadable_file(drive, tmp_path):
    from bevplace_ros.stress.crash_saves import CrashSaveConfig, build_state, run_crash_saves

    state = build_state(_scans(drive), {"place.weights": "random"})
    report = run_crash_saves(CrashSaveConfig(kills=6, max_delay_s=0.4), state, tmp_path)
    assert report.saves_completed >= report.kills, "each kill waits for a finished save, so it lands among saves"
    assert report.intact_loads == report.kills == 6
    assert not any(msg.startswith("LOADED") for msg in report.bad_file_errors.values()), report.bad_file_errors
    assert report.state_kept == len(report.bad_file_errors) == 12


@pytest.mark.parametrize("name, value, message", [
    ("place.rotations", 0, "place.rotations"),
    ("place.device", "tpu", "place.device"),
    ("verifier.min_region_share", 1.5, "verifier.min_region_share"),
])
def test_out_of_range_parameters_name_the_parameter_and_range(ros_context, name, value, message):
    from bevplace_ros.nodes.place_recognition_node import PlaceRecognitionNode
    from bevplace_ros.nodes.registration_node import RegistrationNode

    node_class = RegistrationNode if name.startswith("verifier.") else PlaceRecognitionNode
    with pytest.raises(InvalidParameter, match=message):
        node_class(context=ros_context, parameter_overrides=[Parameter(name, value=value), Parameter("place.weights", value="random")])


def test_missing_weights_file_is_a_clear_start_up_error(ros_context, tmp_path):
    from bevplace_ros.nodes.place_recognition_node import PlaceRecognitionNode

    missing = str(tmp_path / "nope.pt")
    with pytest.raises(Exception, match="nope.pt") as info:
        PlaceRecognitionNode(context=ros_context, parameter_overrides=[Parameter("place.weights", value=missing)])
    assert not isinstance(info.value, (AttributeError, TypeError, KeyError))


def test_cuda_without_a_gpu_is_refused_with_the_fallback_named(ros_context):
    import torch

    from bevplace_ros.nodes.place_recognition_node import PlaceRecognitionNode

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="'auto' or 'cpu'"):
        PlaceRecognitionNode(context=ros_context, parameter_overrides=[Parameter("place.device", value="cuda"),
                                                                        Parameter("place.weights", value="random")])
