"""Trajectory accuracy: ATE after Umeyama alignment and KITTI-style relative pose error."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KITTI_SEGMENT_LENGTHS = (100.0, 200.0, 300.0, 400.0, 500.0, 600.0, 700.0, 800.0)


class TrajectoryError(ValueError):
    """Trajectories that cannot be compared (shape, length, non-finite values)."""


@dataclass(frozen=True)
class Alignment:
    """ref ≈ scale * rotation @ est + translation."""

    rotation: np.ndarray
    translation: np.ndarray
    scale: float

    def apply(self, points: np.ndarray) -> np.ndarray:
        return self.scale * points @ self.rotation.T + self.translation


@dataclass(frozen=True)
class RelativePoseError:
    translation_percent: float  # mean over all segments of |t_err| / length * 100
    rotation_deg_per_m: float  # mean over all segments of angle(R_err) / length
    num_segments: int
    per_length: dict[float, tuple[float, float, int]]  # length -> (t %, deg/m, segments)


def _positions(trajectory: np.ndarray, name: str) -> np.ndarray:
    """Accept (N, 4, 4) poses or (N, 3) positions."""
    arr = np.asarray(trajectory, dtype=float)
    if arr.ndim == 3 and arr.shape[1:] == (4, 4):
        arr = arr[:, :3, 3]
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise TrajectoryError(f"{name} must be (N, 4, 4) poses or (N, 3) positions, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise TrajectoryError(f"{name} contains non-finite values")
    return arr


def _paired(est: np.ndarray, ref: np.ndarray, min_len: int) -> tuple[np.ndarray, np.ndarray]:
    est, ref = _positions(est, "est"), _positions(ref, "ref")
    if len(est) != len(ref):
        raise TrajectoryError(f"est has {len(est)} poses, ref has {len(ref)}: associate them first")
    if len(est) < min_len:
        raise TrajectoryError(f"need at least {min_len} poses, got {len(est)}")
    return est, ref


def align_umeyama(est: np.ndarray, ref: np.ndarray, with_scale: bool = False) -> Alignment:
    """Least-squares similarity (Umeyama 1991) taking est onto ref; SE(3) unless with_scale."""
    est, ref = _paired(est, ref, min_len=3)
    mu_e, mu_r = est.mean(axis=0), ref.mean(axis=0)
    e, r = est - mu_e, ref - mu_r
    cov = r.T @ e / len(est)
    U, D, Vt = np.linalg.svd(cov)
    S = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        S[2, 2] = -1.0  # reflection guard
    R = U @ S @ Vt
    var_e = float((e * e).sum() / len(est))
    if with_scale and var_e == 0.0:
        raise TrajectoryError("est positions are all identical: scale is undefined")
    scale = float(np.trace(np.diag(D) @ S) / var_e) if with_scale else 1.0
    return Alignment(R, mu_r - scale * R @ mu_e, scale)


def ate_rmse(est: np.ndarray, ref: np.ndarray, align: bool = True, with_scale: bool = False) -> float:
    """RMSE of position error [m]; align=False when both trajectories start in the same frame."""
    est, ref = _paired(est, ref, min_len=3 if align else 1)
    if align:
        est = align_umeyama(est, ref, with_scale).apply(est)
    return float(np.sqrt(np.mean(np.sum((est - ref) ** 2, axis=1))))


def relative_pose_error(est: np.ndarray, ref: np.ndarray, lengths: tuple[float, ...] = KITTI_SEGMENT_LENGTHS,
                        step: int = 10) -> RelativePoseError:
    """KITTI odometry metric: for segments starting every `step` frames and spanning each length
    of ground-truth path, the error of the est relative pose against the ref one, per metre."""
    est, ref = np.asarray(est, dtype=float), np.asarray(ref, dtype=float)
    for name, arr in (("est", est), ("ref", ref)):
        if arr.ndim != 3 or arr.shape[1:] != (4, 4) or not np.all(np.isfinite(arr)):
            raise TrajectoryError(f"{name} must be finite (N, 4, 4) poses, got shape {arr.shape}")
    if len(est) != len(ref):
        raise TrajectoryError(f"est has {len(est)} poses, ref has {len(ref)}: associate them first")
    if not isinstance(step, int) or step < 1:
        raise TrajectoryError(f"step must be an int >= 1, got {step!r}")
    if not lengths or min(lengths) <= 0:
        raise TrajectoryError(f"segment lengths must be > 0, got {lengths!r}")
    dist = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(ref[:, :3, 3], axis=0), axis=1))]
    first = np.arange(0, len(ref), step)
    t_all, r_all, per_length = [], [], {}
    for length in lengths:
        last = np.searchsorted(dist, dist[first] + length, side="right")  # first frame beyond `length`
        ok = last < len(ref)
        f, l = first[ok], last[ok]
        if not len(f):
            continue
        d_ref = np.linalg.inv(ref[f]) @ ref[l]
        d_est = np.linalg.inv(est[f]) @ est[l]
        err = np.linalg.inv(d_est) @ d_ref
        t_err = np.linalg.norm(err[:, :3, 3], axis=1) / length
        cos = np.clip((np.trace(err[:, :3, :3], axis1=1, axis2=2) - 1.0) / 2.0, -1.0, 1.0)
        r_err = np.degrees(np.arccos(cos)) / length
        per_length[float(length)] = (float(t_err.mean() * 100.0), float(r_err.mean()), int(len(f)))
        t_all.append(t_err)
        r_all.append(r_err)
    if not t_all:
        raise TrajectoryError(f"trajectory ({dist[-1]:.1f} m) is shorter than every segment length {lengths}")
    t_cat, r_cat = np.concatenate(t_all), np.concatenate(r_all)
    return RelativePoseError(float(t_cat.mean() * 100.0), float(r_cat.mean()), int(len(t_cat)), per_length)
