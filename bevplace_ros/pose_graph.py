"""Keyframe pose graph on gtsam iSAM2: drifting odometry chain + verified, robustified loop factors.

Frames (bevplace_ros.se3 convention, T_a_b maps points in b into a): a keyframe's odometry pose
is T_odom_k, its optimised pose T_map_k. A loop between the query keyframe i (usually newer) and
the match keyframe j is the registration result T_j_i (= T_match_query, LoopClosure.msg).

Covariances arrive in ROS PoseWithCovariance order (x, y, z, rot_x, rot_y, rot_z) and describe a
right (body-frame) perturbation T_true = T_meas * Exp(xi) in the query frame i, which is the
local frame of gtsam's BetweenFactor error. gtsam's Pose3 tangent order is (rot, trans), so the
only conversion is the block swap done by `ros_to_gtsam_covariance`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bevplace_ros.versioned_npz import load_versioned_npz, save_versioned_npz
from bevplace_ros.se3 import invert, rotation_error_deg, translation_error

FORMAT_NAME = "bevplace_ros.pose_graph"
FORMAT_VERSION = 1
LOOP_KERNELS = ("cauchy", "huber", "dcs", "none")
# gtsam tangent index <- ROS covariance index: (rot_x, rot_y, rot_z, x, y, z).
_ROS_TO_GTSAM = np.array([3, 4, 5, 0, 1, 2])


class PoseGraphError(ValueError):
    """Bad input to the pose graph or an unreadable saved graph."""


@dataclass(frozen=True)
class PoseGraphConfig:
    """Noise, robustness and loop-gate settings. Odometry sigmas are per axis, 1-sigma."""

    odom_sigma_trans_floor: float = 0.02  # [m] per edge, even when standing still
    odom_sigma_trans_per_m: float = 0.01  # [m / m travelled]
    odom_sigma_rot_floor_deg: float = 0.05  # [deg] per edge
    odom_sigma_rot_per_m_deg: float = 0.02  # [deg / m travelled]
    prior_sigma_trans: float = 1e-3  # [m] anchor of the first keyframe
    prior_sigma_rot_deg: float = 1e-2  # [deg]
    # Robust kernel on the whitened loop residual r (Mahalanobis norm): cauchy/huber take the width
    # k in units of r, dcs (dynamic covariance scaling) takes Phi in units of r^2. A true loop must
    # keep enough weight to pull in the drift before it, many loop sigmas away. Cauchy does whatever
    # the stated covariance: far out its weight times information is k^2 / error^2 [1/m^2]. DCS
    # decays like sigma^2 / error^4 and ignores true loops when registration covariances are tight.
    loop_kernel: str = "cauchy"  # one of LOOP_KERNELS
    loop_kernel_param: float = 3.0
    max_loop_translation: float = 5.0  # [m] loop-vs-estimate disagreement allowed beyond the chain's
    max_loop_rotation_deg: float = 20.0  # [deg]   odometry uncertainty (see PoseGraph.add_loop)
    loop_gate_sigmas: float = 3.0  # how many chain sigmas the gate adds to those caps
    relinearize_threshold: float = 0.01  # iSAM2: tangent-space change that triggers relinearisation
    # iSAM2 checks every variable for relinearisation every this many odometry updates: O(N) per check,
    # ~6 ms at 6000 keyframes when done on each one. Loop updates always relinearise (force_relinearize).
    relinearize_skip: int = 10
    loop_extra_updates: int = 3  # extra iSAM2 iterations after a loop, which moves many variables
    # Added (in quadrature) to every loop covariance: Hessian-based registration covariances are
    # lower bounds (millimetres), which would make the robust kernel treat true loops as outliers.
    loop_sigma_trans: float = 0.1  # [m]
    loop_sigma_rot_deg: float = 0.5  # [deg]

    def __post_init__(self) -> None:
        for name in ("odom_sigma_trans_floor", "odom_sigma_rot_floor_deg", "prior_sigma_trans",
                     "prior_sigma_rot_deg", "loop_kernel_param", "relinearize_threshold"):
            _require(self, name, lambda v: 0 < v < math.inf, "a finite number > 0")
        for name in ("odom_sigma_trans_per_m", "odom_sigma_rot_per_m_deg", "loop_gate_sigmas", "loop_sigma_trans", "loop_sigma_rot_deg"):
            _require(self, name, lambda v: 0 <= v < math.inf, "a finite number >= 0")
        for name in ("max_loop_translation", "max_loop_rotation_deg"):
            _require(self, name, lambda v: v > 0, "a number > 0 (inf disables the cap)")
        _require(self, "loop_kernel", lambda v: v in LOOP_KERNELS, f"one of {LOOP_KERNELS}")
        _require(self, "relinearize_skip", lambda v: isinstance(v, int) and v >= 1, "an int >= 1")
        _require(self, "loop_extra_updates", lambda v: isinstance(v, int) and 0 <= v <= 100, "an int in [0, 100]")


def _require(cfg: PoseGraphConfig, name: str, ok: Callable[[Any], bool], accepted: str) -> None:
    value = getattr(cfg, name)
    try:
        valid = not isinstance(value, bool) and bool(ok(value))  # NaN fails every comparison
    except TypeError:
        valid = False
    if not valid:
        raise ValueError(f"PoseGraphConfig.{name} must be {accepted}, got {value!r}")


@dataclass(frozen=True)
class LoopDecision:
    accepted: bool
    reason: str


@dataclass(frozen=True)
class Loop:
    """An accepted loop: T_match_query with its ROS-order covariance."""

    match_key: int
    query_key: int
    T_match_query: np.ndarray
    covariance_ros: np.ndarray


def ros_to_gtsam_covariance(covariance_ros: np.ndarray) -> np.ndarray:
    """(x, y, z, rot_x, rot_y, rot_z) -> gtsam Pose3 tangent order (rot_x, rot_y, rot_z, x, y, z)."""
    cov = np.asarray(covariance_ros, dtype=float)
    return cov[np.ix_(_ROS_TO_GTSAM, _ROS_TO_GTSAM)]


def _check_transform(T: Any, what: str) -> np.ndarray:
    T = np.asarray(T, dtype=float)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        raise PoseGraphError(f"{what} must be a finite 4x4 matrix, got shape {T.shape}")
    R = T[:3, :3]
    if not (np.allclose(R.T @ R, np.eye(3), atol=1e-6) and np.linalg.det(R) > 0 and np.allclose(T[3], [0, 0, 0, 1])):
        raise PoseGraphError(f"{what} is not a rigid transform (rotation not orthonormal or last row not 0 0 0 1)")
    return T


def _check_covariance(cov: Any) -> np.ndarray:
    cov = np.asarray(cov, dtype=float)
    if cov.shape == (36,):
        cov = cov.reshape(6, 6)
    if cov.shape != (6, 6) or not np.all(np.isfinite(cov)):
        raise PoseGraphError(f"loop covariance must be a finite 6x6 (or 36-vector), got shape {cov.shape}")
    if not np.allclose(cov, cov.T, rtol=1e-6, atol=1e-12):
        raise PoseGraphError("loop covariance is not symmetric")
    try:
        np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        raise PoseGraphError("loop covariance is not positive definite") from None
    return cov


class PoseGraph:
    """Incremental keyframe graph. Memory per keyframe is constant: key, stamp, odometry pose and
    prefix sums for the loop gate, besides gtsam's own variable and factor."""

    def __init__(self, cfg: PoseGraphConfig | None = None) -> None:
        import gtsam

        self.cfg = cfg or PoseGraphConfig()
        params = gtsam.ISAM2Params()
        params.setRelinearizeThreshold(self.cfg.relinearize_threshold)
        params.relinearizeSkip = self.cfg.relinearize_skip
        # QR, not Cholesky: a loop-free chain ~5 km long (1300 keyframes at 4 m) makes the normal
        # equations so ill-conditioned that Cholesky throws IndeterminateSystemException (stress test).
        params.setFactorization("QR")
        self._isam = gtsam.ISAM2(params)
        self._keys: list[int] = []
        self._index: dict[int, int] = {}
        self._stamps: list[float] = []
        self._odom: list[np.ndarray] = []
        # Prefix sums over edges for the loop gate: arc length s, and with w = sigma_rot^2:
        # sum 3*sigma_t^2, sum w, sum w*s, sum w*s^2 (see _chain_sigmas).
        self._prefix: list[np.ndarray] = []
        self._loops: list[Loop] = []
        self._loop_after: list[int] = []  # number of keyframes when each loop was accepted (replay order)

    # ----------------------------------------------------------------- building the graph
    def add_keyframe(self, key: int, stamp: float, odom_pose: np.ndarray) -> None:
        """Add keyframe `key` with odometry pose T_odom_key; the first is anchored at that pose."""
        import gtsam

        if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
            raise PoseGraphError(f"keyframe key must be an int, got {type(key).__name__}")
        key = int(key)
        if key < 0:
            raise PoseGraphError(f"keyframe key must be >= 0, got {key}")
        if self._keys and key <= self._keys[-1]:
            raise PoseGraphError(f"keyframe keys must increase: got {key} after {self._keys[-1]}")
        try:
            stamp = float(stamp)
        except (TypeError, ValueError):
            raise PoseGraphError(f"keyframe {key}: stamp must be a number, got {stamp!r}") from None
        if not math.isfinite(stamp):
            raise PoseGraphError(f"keyframe {key}: stamp must be finite, got {stamp!r}")
        T_odom_k = _check_transform(odom_pose, f"keyframe {key} odometry pose")
        graph, values = gtsam.NonlinearFactorGraph(), gtsam.Values()
        if not self._keys:
            sigmas = np.r_[np.full(3, np.radians(self.cfg.prior_sigma_rot_deg)), np.full(3, self.cfg.prior_sigma_trans)]
            graph.add(gtsam.PriorFactorPose3(key, gtsam.Pose3(T_odom_k), gtsam.noiseModel.Diagonal.Sigmas(sigmas)))
            values.insert(key, gtsam.Pose3(T_odom_k))
            prefix = np.zeros(5)
        else:
            prev = self._keys[-1]
            T_prev_k = invert(self._odom[-1]) @ T_odom_k
            sigma_t, sigma_r, dist = self._odom_sigmas(T_prev_k)
            noise = gtsam.noiseModel.Diagonal.Sigmas(np.r_[np.full(3, sigma_r), np.full(3, sigma_t)])
            graph.add(gtsam.BetweenFactorPose3(prev, key, gtsam.Pose3(T_prev_k), noise))
            T_map_prev = self._isam.calculateEstimatePose3(prev).matrix()
            values.insert(key, gtsam.Pose3(T_map_prev @ T_prev_k))
            last = self._prefix[-1]
            s = last[0] + dist
            w = sigma_r**2
            prefix = last + np.array([dist, 3 * sigma_t**2, w, w * s, w * s * s])
        self._isam.update(graph, values)
        self._index[key] = len(self._keys)
        self._keys.append(key)
        self._stamps.append(stamp)
        self._odom.append(T_odom_k)
        self._prefix.append(prefix)

    def add_loop(self, match_key: int, query_key: int, T_match_query: np.ndarray, covariance_ros: np.ndarray) -> LoopDecision:
        """Add a verified loop T_match_query (query points -> match frame), or say why not.

        Gate: let d_t, d_r be the translation [m] and rotation [deg] disagreement between the
        measurement and the current estimate of T_match_query, and sigma_t, sigma_r the RMS
        error the odometry noise model accumulates along the chain between the two keyframes
        (rotation noise acting through its lever arm included). The loop is rejected when
        d_t > max_loop_translation + loop_gate_sigmas * sigma_t or
        d_r > max_loop_rotation_deg + loop_gate_sigmas * sigma_r.
        Loops that pass go in behind the configured robust kernel.
        """
        import gtsam

        for name, key in (("match_key", match_key), ("query_key", query_key)):
            if key not in self._index:
                raise PoseGraphError(f"loop {name}={key} is not a keyframe of this graph")
        if match_key == query_key:
            raise PoseGraphError(f"loop joins keyframe {match_key} to itself")
        T_meas = _check_transform(T_match_query, f"loop {match_key}<-{query_key} T_match_query")
        cov = _check_covariance(covariance_ros) + np.diag(np.r_[np.full(3, self.cfg.loop_sigma_trans**2),
                                                                np.full(3, np.radians(self.cfg.loop_sigma_rot_deg) ** 2)])
        T_est = invert(self._isam.calculateEstimatePose3(match_key).matrix()) @ self._isam.calculateEstimatePose3(query_key).matrix()
        d_t, d_r = translation_error(T_meas, T_est), rotation_error_deg(T_meas, T_est)
        sigma_t, sigma_r = self._chain_sigmas(self._index[match_key], self._index[query_key])
        cap_t = self.cfg.max_loop_translation + self.cfg.loop_gate_sigmas * sigma_t
        cap_r = self.cfg.max_loop_rotation_deg + self.cfg.loop_gate_sigmas * sigma_r
        if d_t > cap_t or d_r > cap_r:
            return LoopDecision(False, f"loop {match_key}<-{query_key} disagrees with the estimate by "
                                       f"{d_t:.2f} m / {d_r:.2f} deg, caps {cap_t:.2f} m / {cap_r:.2f} deg")
        self._insert_loop(Loop(int(match_key), int(query_key), T_meas, cov), gtsam)
        return LoopDecision(True, f"accepted: {d_t:.2f} m / {d_r:.2f} deg within caps {cap_t:.2f} m / {cap_r:.2f} deg")

    def _insert_loop(self, loop: Loop, gtsam: Any) -> None:
        noise = gtsam.noiseModel.Gaussian.Covariance(ros_to_gtsam_covariance(loop.covariance_ros))
        kernel = self._kernel(gtsam)
        if kernel is not None:
            noise = gtsam.noiseModel.Robust.Create(kernel, noise)
        graph = gtsam.NonlinearFactorGraph()
        graph.add(gtsam.BetweenFactorPose3(loop.match_key, loop.query_key, gtsam.Pose3(loop.T_match_query), noise))
        self._isam.update(graph, gtsam.Values(), force_relinearize=True)
        for _ in range(self.cfg.loop_extra_updates):
            self._isam.update(force_relinearize=True)
        self._loops.append(loop)
        self._loop_after.append(len(self._keys))

    def _kernel(self, gtsam: Any) -> Any:
        if self.cfg.loop_kernel == "none":
            return None
        est = gtsam.noiseModel.mEstimator
        factory = {"cauchy": est.Cauchy, "huber": est.Huber, "dcs": est.DCS}[self.cfg.loop_kernel]
        return factory.Create(self.cfg.loop_kernel_param)

    def _odom_sigmas(self, T_prev_k: np.ndarray) -> tuple[float, float, float]:
        """Per-axis sigmas [m], [rad] of one odometry edge, growing with the distance travelled."""
        dist = float(np.linalg.norm(T_prev_k[:3, 3]))
        sigma_t = self.cfg.odom_sigma_trans_floor + self.cfg.odom_sigma_trans_per_m * dist
        sigma_r = np.radians(self.cfg.odom_sigma_rot_floor_deg + self.cfg.odom_sigma_rot_per_m_deg * dist)
        return sigma_t, float(sigma_r), dist

    def _chain_sigmas(self, idx_a: int, idx_b: int) -> tuple[float, float]:
        """RMS translation [m] and rotation [deg] error of the odometry chain between two keyframes.

        Independent per-edge errors: E|dt|^2 = sum_k 3 sigma_t,k^2 + 2 sigma_r,k^2 (s_b - s_k)^2,
        where s is the arc length and (s_b - s_k) bounds the lever arm from edge k to the later
        keyframe b; E|dr|^2 = sum_k 3 sigma_r,k^2. Prefix sums make it O(1) per loop.
        """
        lo, hi = sorted((idx_a, idx_b))
        d = self._prefix[hi] - self._prefix[lo]
        s_b = self._prefix[hi][0]
        lever = s_b * s_b * d[2] - 2.0 * s_b * d[3] + d[4]
        var_t = d[1] + 2.0 * max(lever, 0.0)
        return math.sqrt(var_t), math.degrees(math.sqrt(3.0 * d[2]))

    # ----------------------------------------------------------------- results
    @property
    def keys(self) -> list[int]:
        return list(self._keys)

    def optimized_poses(self) -> dict[int, np.ndarray]:
        """T_map_k for every keyframe."""
        import gtsam

        values = self._isam.calculateEstimate()
        rows = gtsam.utilities.extractPose3(values)  # row-major R (9) then t (3), in sorted key order
        poses = np.tile(np.eye(4), (len(rows), 1, 1))
        poses[:, :3, :3] = rows[:, :9].reshape(-1, 3, 3)
        poses[:, :3, 3] = rows[:, 9:]
        return dict(zip(sorted(values.keys()), poses))

    def stamps(self) -> dict[int, float]:
        """Keyframe stamps [s] as given to add_keyframe."""
        return dict(zip(self._keys, self._stamps))

    def odometry_poses(self) -> dict[int, np.ndarray]:
        """T_odom_k as given to add_keyframe."""
        return {k: T.copy() for k, T in zip(self._keys, self._odom)}

    def map_to_odom(self) -> np.ndarray:
        """T_map_odom = T_map_latest @ inv(T_odom_latest): the correction to publish on /tf."""
        if not self._keys:
            return np.eye(4)
        return self._isam.calculateEstimatePose3(self._keys[-1]).matrix() @ invert(self._odom[-1])

    def loops(self) -> list[Loop]:
        return list(self._loops)

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Write config, keyframes, odometry and accepted loops to one .npz file, atomically."""
        arrays = {
            "config": np.array(json.dumps(asdict(self.cfg))),
            "keys": np.array(self._keys, dtype=np.int64),
            "stamps": np.array(self._stamps, dtype=float),
            "odom": np.array(self._odom, dtype=float).reshape(-1, 4, 4),
            "loop_keys": np.array([(lp.match_key, lp.query_key) for lp in self._loops], dtype=np.int64).reshape(-1, 2),
            "loop_T": np.array([lp.T_match_query for lp in self._loops], dtype=float).reshape(-1, 4, 4),
            "loop_cov": np.array([lp.covariance_ros for lp in self._loops], dtype=float).reshape(-1, 6, 6),
            "loop_after": np.array(self._loop_after, dtype=np.int64),
        }
        return save_versioned_npz(path, FORMAT_NAME, FORMAT_VERSION, arrays)

    @classmethod
    def load(cls, path: str | Path) -> PoseGraph:
        """Rebuild a saved graph by replaying its keyframes and loops in their original order,
        which reproduces the saved iSAM2 estimate; raises PoseGraphError on any unreadable file."""
        arrays = _read_arrays(Path(path))
        try:
            cfg = PoseGraphConfig(**json.loads(str(arrays["config"])))
        except (TypeError, ValueError) as exc:
            raise PoseGraphError(f"{path}: stored config is invalid: {exc}") from None
        _check_saved_shapes(arrays, path)
        graph = cls(cfg)
        import gtsam

        try:
            loop_i = 0
            n_loops = len(arrays["loop_after"])
            for n, (key, stamp, T) in enumerate(zip(arrays["keys"], arrays["stamps"], arrays["odom"]), start=1):
                graph.add_keyframe(int(key), float(stamp), T)
                while loop_i < n_loops and arrays["loop_after"][loop_i] == n:
                    (j, i), T_ji, cov = arrays["loop_keys"][loop_i], arrays["loop_T"][loop_i], arrays["loop_cov"][loop_i]
                    for name, k in (("match", j), ("query", i)):
                        if int(k) not in graph._index:
                            raise PoseGraphError(f"loop {loop_i} {name} key {k} is not a saved keyframe")
                    graph._insert_loop(Loop(int(j), int(i), _check_transform(T_ji, f"loop {loop_i}"), _check_covariance(cov)), gtsam)
                    loop_i += 1
            if loop_i != n_loops:
                raise PoseGraphError(f"loop order table is inconsistent ({n_loops - loop_i} loops never replayed)")
        except PoseGraphError as exc:
            raise PoseGraphError(f"{path}: {exc}") from None
        return graph


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    expected = ("config", "keys", "stamps", "odom", "loop_keys", "loop_T", "loop_cov", "loop_after")
    return load_versioned_npz(path, FORMAT_NAME, FORMAT_VERSION, expected, PoseGraphError)


def _check_saved_shapes(a: dict[str, np.ndarray], path: str | Path) -> None:
    n, m = len(a["keys"]), len(a["loop_after"])
    expected = {"keys": (n,), "stamps": (n,), "odom": (n, 4, 4), "loop_keys": (m, 2), "loop_T": (m, 4, 4),
                "loop_cov": (m, 6, 6), "loop_after": (m,)}
    for name, shape in expected.items():
        if a[name].shape != shape:
            raise PoseGraphError(f"{path}: field {name} has shape {a[name].shape}, expected {shape}")
    if m and (np.any(np.diff(a["loop_after"]) < 0) or a["loop_after"][0] < 1 or a["loop_after"][-1] > n):
        raise PoseGraphError(f"{path}: loop order table is not within 1..{n} and sorted")

