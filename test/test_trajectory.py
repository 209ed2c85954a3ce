"""ATE / Umeyama / KITTI RPE on trajectories whose true errors are known in closed form."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from bevplace_ros.evaluation.trajectory import TrajectoryError, align_umeyama, ate_rmse, relative_pose_error
from bevplace_ros.se3 import random_rotation


def _helix(n: int = 500, step: float = 1.0) -> np.ndarray:
    """Poses along a gently climbing circle of radius 80 m, heading along the path."""
    yaw = np.arange(n) * step / 80.0
    poses = np.tile(np.eye(4), (n, 1, 1))
    poses[:, :3, :3] = Rotation.from_euler("z", yaw[:, None]).as_matrix()
    poses[:, :3, 3] = np.c_[80 * np.sin(yaw), 80 * (1 - np.cos(yaw)), 0.01 * np.arange(n)]
    return poses


@pytest.mark.parametrize("with_scale", [False, True])
def test_umeyama_recovers_known_transform(rng: np.random.Generator, with_scale: bool) -> None:
    est = rng.normal(size=(200, 3)) * 10
    R, t, s = random_rotation(rng), rng.normal(size=3) * 5, (1.7 if with_scale else 1.0)
    ref = s * est @ R.T + t
    a = align_umeyama(est, ref, with_scale=with_scale)
    assert np.allclose(a.rotation, R, atol=1e-9) and np.allclose(a.translation, t, atol=1e-9)
    assert a.scale == pytest.approx(s, abs=1e-9)
    assert np.allclose(a.apply(est), ref, atol=1e-9)


def test_ate_identical_is_zero_and_shift_is_known(rng: np.random.Generator) -> None:
    ref = _helix()
    assert ate_rmse(ref, ref) == pytest.approx(0.0, abs=1e-9)
    shifted = ref.copy()
    shifted[:, :3, 3] += [1.0, 2.0, 2.0]
    assert ate_rmse(shifted, ref, align=False) == pytest.approx(3.0, abs=1e-12)
    assert ate_rmse(shifted, ref) == pytest.approx(0.0, abs=1e-9)  # a rigid shift aligns away
    noise = rng.normal(scale=0.1, size=(len(ref), 3))
    noisy = ref[:, :3, 3] + noise
    expected = np.sqrt(np.mean(np.sum(noise**2, axis=1)))
    assert ate_rmse(noisy, ref, align=False) == pytest.approx(expected, rel=1e-12)
    assert ate_rmse(noisy, ref) < expected  # alignment can only lower it


def test_rpe_of_scale_drift_and_rotation_drift() -> None:
    ref = _helix()
    exact = relative_pose_error(ref, ref, lengths=(100.0, 200.0))
    assert exact.translation_percent == pytest.approx(0.0, abs=1e-9) and exact.rotation_deg_per_m == pytest.approx(0.0, abs=1e-9)
    # Odometry 1 % too long on a straight 1 m-step line. As in the KITTI devkit a segment ends at
    # the first frame strictly beyond its length (101 m for 100 m), so the error is 1.01 m per 100 m.
    line = np.tile(np.eye(4), (400, 1, 1))
    line[:, 0, 3] = np.arange(400.0)
    scaled = line.copy()
    scaled[:, :3, 3] *= 1.01
    rpe = relative_pose_error(scaled, line, lengths=(100.0,), step=10)
    assert rpe.translation_percent == pytest.approx(1.01, rel=1e-9)
    assert rpe.rotation_deg_per_m == pytest.approx(0.0, abs=1e-9)
    assert rpe.num_segments == len(range(0, 400 - 101, 10)) == rpe.per_length[100.0][2]
    # Heading drifting by 0.01 deg per metre of path: the relative rotation error is 0.01 deg/m
    # (up to the devkit's choice of the first frame past each length, 1 m steps here).
    dist = np.arange(len(ref), dtype=float) * np.linalg.norm(ref[1, :3, 3] - ref[0, :3, 3])
    drifted = ref.copy()
    drifted[:, :3, :3] = ref[:, :3, :3] @ Rotation.from_euler("z", np.radians(0.01 * dist)[:, None]).as_matrix()
    rpe = relative_pose_error(drifted, ref, lengths=(100.0,))
    assert rpe.rotation_deg_per_m == pytest.approx(0.01, rel=0.02)


def test_bad_inputs_raise() -> None:
    ref = _helix(50)
    with pytest.raises(TrajectoryError, match="associate"):
        ate_rmse(ref[:-1], ref)
    with pytest.raises(TrajectoryError, match="shape"):
        ate_rmse(np.zeros((5, 2)), np.zeros((5, 2)))
    bad = ref.copy()
    bad[3, 0, 3] = np.nan
    with pytest.raises(TrajectoryError, match="non-finite"):
        ate_rmse(bad, ref)
    with pytest.raises(TrajectoryError, match="shorter"):
        relative_pose_error(ref, ref)  # 50 m against the 100..800 m KITTI lengths
    with pytest.raises(TrajectoryError, match="identical"):
        align_umeyama(np.zeros((5, 3)), np.ones((5, 3)), with_scale=True)
