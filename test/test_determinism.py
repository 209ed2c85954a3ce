"""A lock-step replay repeats: same keyframes, candidates, loop closures and accepted loops; poses agree to 1e-6.

Thread scheduling must not leak into results: the nodes run on a multi-threaded executor with worker
threads, RANSAC draws from a seeded generator per pair, and GICP runs on one thread (small_gicp's
multi-threaded reduction sums in a different order each run). KISS-Matcher (the default global
registration) runs on TBB threads and its pose can differ in the 7th digit on a loaded machine: that
much is inherent, so poses are compared to a bound and the loop sets exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import replay_options
from bevplace_ros.nodes.bag_replay import replay


def _closures(run) -> list[tuple[int, int, bool]]:
    return [(query, match, verified) for query, match, _, verified, _ in run.closures]


POSE_BOUND = 1e-6  # metres and rotation-matrix entries


def _assert_same_run(first, second) -> None:
    assert any(verified for *_, verified in _closures(first)), "no verified loop: the comparison would test nothing"
    assert second.keyframe_stamps == first.keyframe_stamps and second.candidates == first.candidates
    assert _closures(second) == _closures(first)
    for a, b in zip(first.closures, second.closures):
        np.testing.assert_allclose(b[2], a[2], rtol=0, atol=POSE_BOUND, err_msg=f"loop {a[1]}<-{a[0]}: relative pose")
    assert second.graph_loops == first.graph_loops
    assert second.optimized.keys() == first.optimized.keys()
    for key, pose in first.optimized.items():
        np.testing.assert_allclose(second.optimized[key], pose, rtol=0, atol=POSE_BOUND, err_msg=f"optimised pose of keyframe {key}")


@pytest.mark.long
def test_two_lock_step_replays_of_one_bag_give_the_same_loop_closures(drive, drive_replay, tmp_path):
    """A second full replay of the shared drive (~35 s): long, to keep the default suite under 6 minutes."""
    _assert_same_run(drive_replay[1], replay(replay_options(drive, tmp_path, record=None)))


@pytest.mark.long
def test_two_replays_of_the_demo_bag_agree(tmp_path):
    """What `bevplace-ros demo` runs, twice (several minutes each)."""
    from bevplace_ros.commands.demo import DEMO_BAG

    if not DEMO_BAG.exists():
        pytest.skip(f"{DEMO_BAG} is made by scripts/setup.sh")
    _assert_same_run(*(replay(replay_options(DEMO_BAG, tmp_path / str(i), record=None)) for i in range(2)))


def test_preprocessing_and_gicp_refinement_repeat_bit_for_bit(torch_one_thread):
    """With small_gicp on two threads both differed in the last bits on most repeats."""
    from bevplace_ros.commands.benchmark_place import simulated_kitti_scans
    from bevplace_ros.registration import Registrar
    from bevplace_ros.registration.refine import RefineConfig, gicp_refine
    from bevplace_ros.se3 import xyyaw_to_matrix

    registrar = Registrar()
    scans = simulated_kitti_scans((0, 3))
    source, target = (registrar.preprocess(scan) for scan in scans)
    for _ in range(3):
        again = registrar.preprocess(scans[0])
        np.testing.assert_array_equal(again.gicp_points, source.gicp_points)
        np.testing.assert_array_equal(np.asarray(again.gicp_cloud.covs()), np.asarray(source.gicp_cloud.covs()))
    results = [gicp_refine(source, target, xyyaw_to_matrix(3.0, 0.0, 0.02), RefineConfig()) for _ in range(4)]
    assert results[0].fitness > 0.5
    for result in results[1:]:
        np.testing.assert_array_equal(result.transform, results[0].transform)
        np.testing.assert_array_equal(result.hessian, results[0].hessian)
