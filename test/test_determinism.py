"""A lock-step replay repeats bit for bit: same keyframes, candidates, loop closures and optimised path.

Thread scheduling must not leak into results: the nodes run on a multi-threaded executor with worker
threads, RANSAC draws from a seeded generator per pair, and GICP runs on one thread (small_gicp's
multi-threaded reduction sums in a different order each run).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import replay_options
from bevplace_ros.nodes.bag_replay import replay


def _closures(run) -> list[tuple[int, int, bool]]:
    return [(query, match, verified) for query, match, _, verified, _ in run.closures]


def _assert_same_run(first, second) -> None:
    assert any(verified for *_, verified in _closures(first)), "no verified loop: the comparison would test nothing"
    assert second.keyframe_stamps == first.keyframe_stamps and second.candidates == first.candidates
    assert _closures(second) == _closures(first)
    for a, b in zip(first.closures, second.closures):
        np.testing.assert_array_equal(a[2], b[2], err_msg=f"loop {a[1]}<-{a[0]}: relative pose differs")
    assert second.graph_loops == first.graph_loops
    assert second.optimized.keys() == first.optimized.keys()
    for key, pose in first.optimized.items():
        np.testing.assert_array_equal(second.optimized[key], pose, err_msg=f"optimised pose of keyframe {key}")


def test_two_lock_step_replays_of_one_bag_give_the_same_loop_closures(drive, drive_replay, tmp_path):
    _assert_same_run(drive_replay[1], replay(replay_options(drive, tmp_path, record=None)))


@pytest.mark.long
def test_two_replays_of_the_demo_bag_agree(tmp_path):
    """What `bevplace-ros demo` runs, twice (several minutes each)."""
    from bevplace_ros.commands.demo import DEMO_BAG

    if not DEMO_BAG.exists():
        pytest.skip(f"{DEMO_BAG} is made by scripts/setup.sh")
    _assert_same_run(*(replay(replay_options(DEMO_BAG, tmp_path / str(i), record=None)) for i in range(2)))


def test_default_registration_repeats_bit_for_bit(torch_one_thread):
    from bevplace_ros.commands.benchmark_place import simulated_kitti_scans
    from bevplace_ros.registration import Registrar

    query, match = simulated_kitti_scans((0, 3))
    registrar = Registrar()
    source, target = registrar.preprocess(query), registrar.preprocess(match)
    results = [registrar.register_prepared(source, target) for _ in range(3)]
    assert results[0].verified
    for result in results[1:]:
        np.testing.assert_array_equal(result.transform, results[0].transform)
        np.testing.assert_array_equal(result.covariance, results[0].covariance)
        assert result.fitness == results[0].fitness
