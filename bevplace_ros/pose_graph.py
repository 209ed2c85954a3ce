"""Keyframe pose graph on gtsam iSAM2: drifting odometry chain + verified, robustified loop factors.

Frames (bevplace_ros.se3 convention, T_a_b maps points in b into a): a keyframe's odometry pose
is T_odom_k, its optimised pose T_map_k. A loop between the query keyframe i (usually newer) and
the match keyframe j is the registration result T_j_i (= T_match_query, LoopClosure.msg).

Covariances arrive in ROS PoseWithCovariance order (x, y, z, rot_x, rot_y, rot_z) and describe a
right (body-frame) perturbation T_true = T_meas * Exp(xi) in the query frame i, which is the
local frame of gtsam's BetweenFactor error. gtsam's Pose3 tangent order is (rot, trans), so the
only conversion is the block swap done by `ros_to_gtsam_covariance`.

Sessions: every run of the robot (each start in a fresh odometry frame) is a session with its own
odometry chain. The first session ever added defines the map frame (tight prior on its first
keyframe). A later session (`start_session`, e.g. after loading yesterday's map) has an unknown
anchor T_map_odom: its keyframes are kept out of the optimisation until `anchor_loops` verified
loops to already anchored sessions, from different query keyframes, agree on that anchor. Only then
is the whole session inserted, initialised exactly from the agreed anchor. Deferring, rather than
inserting the chain with a very loose prior, is chosen because iSAM2 linearises at the initial
estimate: a chain inserted at an arbitrary pose and later swung round by up to 180 degrees and
kilometres relies on relinearisation from far away, and the loose prior would stay in the graph
as a small bias. A wrong first loop is held pending, never used alone: it anchors nothing unless
a second, independent loop agrees with it, and it is dropped when another pair agrees.
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
FORMAT_VERSION = 2  # 2: per-keyframe sessions; version 1 files (one session) still load
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
    # A new session is anchored to the map once this many inter-session loops from different query
    # keyframes give anchors T_map_odom that agree (each anchor applied to the other's query keyframe)
    # within these tolerances plus loop_gate_sigmas times the odometry chain sigma between them.
    anchor_loops: int = 2
    anchor_agree_translation: float = 2.0  # [m]
    anchor_agree_rotation_deg: float = 5.0  # [deg]
    max_pending_loops: int = 100  # anchor hypotheses held per unanchored session (oldest dropped)

    def __post_init__(self) -> None:
        for name in ("odom_sigma_trans_floor", "odom_sigma_rot_floor_deg", "prior_sigma_trans",
                     "prior_sigma_rot_deg", "loop_kernel_param", "relinearize_threshold",
                     "anchor_agree_translation", "anchor_agree_rotation_deg"):
            _require(self, name, lambda v: 0 < v < math.inf, "a finite number > 0")
        for name in ("odom_sigma_trans_per_m", "odom_sigma_rot_per_m_deg", "loop_gate_sigmas", "loop_sigma_trans", "loop_sigma_rot_deg"):
            _require(self, name, lambda v: 0 <= v < math.inf, "a finite number >= 0")
        for name in ("max_loop_translation", "max_loop_rotation_deg"):
            _require(self, name, lambda v: v > 0, "a number > 0 (inf disables the cap)")
        _require(self, "loop_kernel", lambda v: v in LOOP_KERNELS, f"one of {LOOP_KERNELS}")
        _require(self, "relinearize_skip", lambda v: isinstance(v, int) and v >= 1, "an int >= 1")
        _require(self, "loop_extra_updates", lambda v: isinstance(v, int) and 0 <= v <= 100, "an int in [0, 100]")
        _require(self, "anchor_loops", lambda v: isinstance(v, int) and 1 <= v <= 100, "an int in [1, 100]")
        _require(self, "max_pending_loops", lambda v: isinstance(v, int) and v >= 1, "an int >= 1")


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
    accepted: bool  # in the optimisation now (or, inside an unanchored session, once it is anchored)
    reason: str
    held: bool = False  # an anchor hypothesis of an unanchored session, waiting for a second loop


@dataclass(frozen=True)
class Anchoring:
    """How a session joined the map: after `after` keyframes, by loops from these query keyframes."""

    session: int
    query_keys: tuple[int, ...]
    after: int
    T_map_odom: np.ndarray
    dropped: int  # held hypotheses that disagreed with the anchoring loops


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
    """Incremental keyframe graph. Memory per keyframe is constant: key, stamp, session, odometry pose
    and prefix sums for the loop gate, besides gtsam's own variable and factor."""

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
        self._session_of: list[int] = []  # per keyframe
        # Prefix sums over edges for the loop gate: arc length s, and with w = sigma_rot^2:
        # sum 3*sigma_t^2, sum w, sum w*s, sum w*s^2 (see _chain_sigmas). No edge joins two sessions.
        self._prefix: list[np.ndarray] = []
        self._loops: list[Loop] = []
        self._loop_after: list[int] = []  # number of keyframes when each loop was accepted (replay order)
        # Every loop not refused outright, in arrival order with the keyframe count then: saving this
        # log and replaying it through add_loop rebuilds the same graph, held and pending loops too.
        self._log: list[tuple[Loop, int]] = []
        self._session = 0  # the live session: new keyframes join it
        self._session_start: dict[int, int] = {}  # session -> index of its first keyframe
        self._anchorings: dict[int, Anchoring] = {}  # sessions joined by loops
        self._held: dict[int, list[Loop]] = {}  # intra-session loops of unanchored sessions
        self._pending: dict[int, list[tuple[Loop, np.ndarray]]] = {}  # anchor hypotheses (loop, T_map_odom)

    # ----------------------------------------------------------------- sessions
    def start_session(self) -> int:
        """Later keyframes start a new session, in a new odometry frame with an unknown anchor."""
        if self._session in self._session_start:
            self._session = max(self._session_start) + 1
        return self._session

    @property
    def session(self) -> int:
        return self._session

    def anchored(self, session: int) -> bool:
        """Whether the session's keyframes are in the map frame (the first session always is)."""
        return session in self._anchorings or (session in self._session_start and self._session_start[session] == 0)

    @property
    def localized(self) -> bool:
        """Whether the live session is anchored, i.e. map_to_odom() means something."""
        return self._session in self._session_start and self.anchored(self._session)

    def sessions(self) -> dict[int, int]:
        """Keyframe -> session."""
        return dict(zip(self._keys, self._session_of))

    def anchorings(self) -> dict[int, Anchoring]:
        return dict(self._anchorings)

    def status(self) -> dict[str, Any]:
        """What a diagnostics message needs: live session, localised or not, counts."""
        pending = self._pending.get(self._session, [])
        return {"session": self._session, "sessions": len(self._session_start), "localized": self.localized,
                "keyframes": len(self._keys), "loops": len(self._loops), "pending_anchor_loops": len(pending)}

    # ----------------------------------------------------------------- building the graph
    def add_keyframe(self, key: int, stamp: float, odom_pose: np.ndarray) -> None:
        """Add keyframe `key` with odometry pose T_odom_key to the live session; the very first keyframe
        is anchored at that pose, a later session's keyframes wait for the session's anchoring."""
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
        idx = len(self._keys)
        first = self._session not in self._session_start
        if first:
            self._session_start[self._session] = idx
            prefix = self._prefix[-1].copy() if self._prefix else np.zeros(5)
        else:
            sigma_t, sigma_r, dist = self._odom_sigmas(invert(self._odom[-1]) @ T_odom_k)
            last = self._prefix[-1]
            s, w = last[0] + dist, sigma_r**2
            prefix = last + np.array([dist, 3 * sigma_t**2, w, w * s, w * s * s])
        self._index[key] = idx
        self._keys.append(key)
        self._stamps.append(stamp)
        self._odom.append(T_odom_k)
        self._session_of.append(self._session)
        self._prefix.append(prefix)
        if not self.anchored(self._session):
            return
        graph, values = gtsam.NonlinearFactorGraph(), gtsam.Values()
        if first:  # the first session: its first pose defines the map frame
            sigmas = np.r_[np.full(3, np.radians(self.cfg.prior_sigma_rot_deg)), np.full(3, self.cfg.prior_sigma_trans)]
            graph.add(gtsam.PriorFactorPose3(key, gtsam.Pose3(T_odom_k), gtsam.noiseModel.Diagonal.Sigmas(sigmas)))
            values.insert(key, gtsam.Pose3(T_odom_k))
        else:
            prev = self._keys[idx - 1]
            graph.add(self._odom_factor(idx, gtsam))
            T_map_prev = self._isam.calculateEstimatePose3(prev).matrix()
            values.insert(key, gtsam.Pose3(T_map_prev @ invert(self._odom[idx - 1]) @ T_odom_k))
        self._isam.update(graph, values)

    def _odom_factor(self, idx: int, gtsam: Any) -> Any:
        """Odometry factor from keyframe idx-1 to idx (same session)."""
        T_prev_k = invert(self._odom[idx - 1]) @ self._odom[idx]
        sigma_t, sigma_r, _ = self._odom_sigmas(T_prev_k)
        noise = gtsam.noiseModel.Diagonal.Sigmas(np.r_[np.full(3, sigma_r), np.full(3, sigma_t)])
        return gtsam.BetweenFactorPose3(self._keys[idx - 1], self._keys[idx], gtsam.Pose3(T_prev_k), noise)

    def add_loop(self, match_key: int, query_key: int, T_match_query: np.ndarray, covariance_ros: np.ndarray) -> LoopDecision:
        """Add a verified loop T_match_query (query points -> match frame), hold it, or say why not.

        Gate: let d_t, d_r be the translation [m] and rotation [deg] disagreement between the
        measurement and the current estimate of T_match_query, and sigma_t, sigma_r the RMS
        error the odometry noise model accumulates along the chain between the two keyframes
        (rotation noise acting through its lever arm included; between sessions, the chains from
        each keyframe to its session's anchor). The loop is rejected when
        d_t > max_loop_translation + loop_gate_sigmas * sigma_t or
        d_r > max_loop_rotation_deg + loop_gate_sigmas * sigma_r.
        Loops that pass go in behind the configured robust kernel. A loop from an unanchored session
        to the map is an anchor hypothesis instead (see the module docstring).
        """
        for name, key in (("match_key", match_key), ("query_key", query_key)):
            if key not in self._index:
                raise PoseGraphError(f"loop {name}={key} is not a keyframe of this graph")
        if match_key == query_key:
            raise PoseGraphError(f"loop joins keyframe {match_key} to itself")
        T_meas = _check_transform(T_match_query, f"loop {match_key}<-{query_key} T_match_query")
        cov = _check_covariance(covariance_ros) + np.diag(np.r_[np.full(3, self.cfg.loop_sigma_trans**2),
                                                                np.full(3, np.radians(self.cfg.loop_sigma_rot_deg) ** 2)])
        return self._offer(Loop(int(match_key), int(query_key), T_meas, cov))

    def _offer(self, loop: Loop) -> LoopDecision:
        """add_loop after validation, with the covariance floor already added (as saved)."""
        import gtsam

        match_key, query_key = loop.match_key, loop.query_key
        s_m, s_q = self._session_of[self._index[match_key]], self._session_of[self._index[query_key]]
        if self.anchored(s_m) and not self.anchored(s_q):
            return self._anchor_hypothesis(loop, s_q, gtsam)
        if s_m != s_q and not (self.anchored(s_m) and self.anchored(s_q)):
            return LoopDecision(False, f"loop {match_key}<-{query_key}: session {s_m if not self.anchored(s_m) else s_q} "
                                       "is not anchored to the map; only loops into anchored sessions can anchor it")
        decision = self._gate(loop, s_m, s_q)
        if not decision.accepted:
            return decision
        self._log.append((loop, len(self._keys)))
        if not self.anchored(s_q):  # both in the same unanchored session
            self._held.setdefault(s_q, []).append(loop)
            return LoopDecision(True, decision.reason + f"; held until session {s_q} is anchored")
        self._insert_loops([loop], gtsam)
        return decision

    def _gate(self, loop: Loop, s_m: int, s_q: int) -> LoopDecision:
        T_est = invert(self._pose(loop.match_key)) @ self._pose(loop.query_key)
        d_t, d_r = translation_error(loop.T_match_query, T_est), rotation_error_deg(loop.T_match_query, T_est)
        i_m, i_q = self._index[loop.match_key], self._index[loop.query_key]
        if s_m == s_q:
            sigma_t, sigma_r = self._chain_sigmas(i_m, i_q)
        else:
            (t_m, r_m), (t_q, r_q) = (self._chain_sigmas(i, self._anchor_index(s)) for i, s in ((i_m, s_m), (i_q, s_q)))
            sigma_t, sigma_r = math.hypot(t_m, t_q), math.hypot(r_m, r_q)
        cap_t = self.cfg.max_loop_translation + self.cfg.loop_gate_sigmas * sigma_t
        cap_r = self.cfg.max_loop_rotation_deg + self.cfg.loop_gate_sigmas * sigma_r
        name = f"loop {loop.match_key}<-{loop.query_key}"
        if d_t > cap_t or d_r > cap_r:
            return LoopDecision(False, f"{name} disagrees with the estimate by {d_t:.2f} m / {d_r:.2f} deg, "
                                       f"caps {cap_t:.2f} m / {cap_r:.2f} deg")
        return LoopDecision(True, f"accepted: {d_t:.2f} m / {d_r:.2f} deg within caps {cap_t:.2f} m / {cap_r:.2f} deg")

    def _pose(self, key: int) -> np.ndarray:
        """Current estimate: optimised in an anchored session, the odometry pose in an unanchored one."""
        idx = self._index[key]
        if self.anchored(self._session_of[idx]):
            return self._isam.calculateEstimatePose3(key).matrix()
        return self._odom[idx]

    def _anchor_index(self, session: int) -> int:
        """The keyframe that ties the session to the map: its first (map session) or latest anchoring query."""
        anchoring = self._anchorings.get(session)
        return self._session_start[session] if anchoring is None else self._index[anchoring.query_keys[-1]]

    def _anchor_hypothesis(self, loop: Loop, session: int, gtsam: Any) -> LoopDecision:
        """Hold a loop from an unanchored session to the map; anchor the session once enough agree."""
        i_q = self._index[loop.query_key]
        T_map_odom = self._pose(loop.match_key) @ loop.T_match_query @ invert(self._odom[i_q])
        self._log.append((loop, len(self._keys)))
        pending = self._pending.setdefault(session, [])
        agree = [(lp, T) for lp, T in pending if self._anchors_agree(lp.query_key, T, loop.query_key, T_map_odom)]
        agree.append((loop, T_map_odom))
        queries = {lp.query_key for lp, _ in agree}
        if len(queries) < self.cfg.anchor_loops:
            pending.append((loop, T_map_odom))
            del pending[: -self.cfg.max_pending_loops]
            return LoopDecision(False, f"anchor hypothesis for session {session} held, "
                                       f"{len(queries)} of {self.cfg.anchor_loops} agreeing query keyframes", held=True)
        dropped = len(pending) + 1 - len(agree)
        self._join(session, T_map_odom, [lp for lp, _ in agree], dropped, gtsam)
        return LoopDecision(True, f"session {session} anchored by loops from keyframes {sorted(queries)}; "
                                  f"{dropped} disagreeing hypotheses dropped")

    def _anchors_agree(self, key_a: int, T_a: np.ndarray, key_b: int, T_b: np.ndarray) -> bool:
        i_a, i_b = self._index[key_a], self._index[key_b]
        sigma_t, sigma_r = self._chain_sigmas(i_a, i_b)
        for i in (i_a, i_b):
            pose_a, pose_b = T_a @ self._odom[i], T_b @ self._odom[i]
            if (translation_error(pose_a, pose_b) > self.cfg.anchor_agree_translation + self.cfg.loop_gate_sigmas * sigma_t
                    or rotation_error_deg(pose_a, pose_b) > self.cfg.anchor_agree_rotation_deg + self.cfg.loop_gate_sigmas * sigma_r):
                return False
        return True

    def _join(self, session: int, T_map_odom: np.ndarray, loops: list[Loop], dropped: int, gtsam: Any) -> None:
        """Insert the whole session, initialised from the agreed anchor, then its held and anchoring loops."""
        start = self._session_start[session]
        members = [i for i in range(start, len(self._keys)) if self._session_of[i] == session]
        graph, values = gtsam.NonlinearFactorGraph(), gtsam.Values()
        for i in members:
            values.insert(self._keys[i], gtsam.Pose3(T_map_odom @ self._odom[i]))
            if i != start:
                graph.add(self._odom_factor(i, gtsam))
        self._anchorings[session] = Anchoring(session, tuple(lp.query_key for lp in loops), len(self._keys), T_map_odom, dropped)
        self._pending.pop(session, None)
        # One update: the chain alone, with no factor tying it to the map, would be indeterminate.
        self._insert_loops([*self._held.pop(session, []), *loops], gtsam, graph, values)

    def _insert_loops(self, loops: list[Loop], gtsam: Any, graph: Any = None, values: Any = None) -> None:
        """Loop factors (behind the kernel) plus any other new factors and values, in one iSAM2 update."""
        kernel = self._kernel(gtsam)
        graph = gtsam.NonlinearFactorGraph() if graph is None else graph
        for loop in loops:
            noise = gtsam.noiseModel.Gaussian.Covariance(ros_to_gtsam_covariance(loop.covariance_ros))
            if kernel is not None:
                noise = gtsam.noiseModel.Robust.Create(kernel, noise)
            graph.add(gtsam.BetweenFactorPose3(loop.match_key, loop.query_key, gtsam.Pose3(loop.T_match_query), noise))
        self._isam.update(graph, gtsam.Values() if values is None else values, force_relinearize=True)
        for _ in range(self.cfg.loop_extra_updates):
            self._isam.update(force_relinearize=True)
        self._loops.extend(loops)
        self._loop_after.extend([len(self._keys)] * len(loops))

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

    def map_to_odom(self) -> np.ndarray | None:
        """T_map_odom = T_map_latest @ inv(T_odom_latest) of the live session: the correction to publish
        on /tf; None while the live session is not anchored (its place in the map is unknown)."""
        if not self._keys:
            return np.eye(4)
        if not self.localized:
            return None
        return self._isam.calculateEstimatePose3(self._keys[-1]).matrix() @ invert(self._odom[-1])

    def loops(self) -> list[Loop]:
        """Loops in the optimisation."""
        return list(self._loops)

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Write config, keyframes with their sessions, odometry and the loop log to one .npz file, atomically."""
        loops = [lp for lp, _ in self._log]
        arrays = {
            "config": np.array(json.dumps(asdict(self.cfg))),
            "keys": np.array(self._keys, dtype=np.int64),
            "stamps": np.array(self._stamps, dtype=float),
            "odom": np.array(self._odom, dtype=float).reshape(-1, 4, 4),
            "sessions": np.array(self._session_of, dtype=np.int64),
            "loop_keys": np.array([(lp.match_key, lp.query_key) for lp in loops], dtype=np.int64).reshape(-1, 2),
            "loop_T": np.array([lp.T_match_query for lp in loops], dtype=float).reshape(-1, 4, 4),
            "loop_cov": np.array([lp.covariance_ros for lp in loops], dtype=float).reshape(-1, 6, 6),
            "loop_after": np.array([after for _, after in self._log], dtype=np.int64),
        }
        return save_versioned_npz(path, FORMAT_NAME, FORMAT_VERSION, arrays)

    @classmethod
    def load(cls, path: str | Path) -> PoseGraph:
        """Rebuild a saved graph by replaying its keyframes and loops in their original order, which
        reproduces the saved iSAM2 estimate and every session's anchoring; the live session is the
        last saved one (call start_session to continue in a new one). Version 1 files (one session,
        accepted loops only) load too. Raises PoseGraphError on any unreadable file."""
        arrays = _read_arrays(Path(path))
        try:
            cfg = PoseGraphConfig(**json.loads(str(arrays["config"])))
        except (TypeError, ValueError) as exc:
            raise PoseGraphError(f"{path}: stored config is invalid: {exc}") from None
        _check_saved_shapes(arrays, path)
        graph = cls(cfg)
        try:
            loop_i = 0
            n_loops = len(arrays["loop_after"])
            for n, (key, stamp, T, session) in enumerate(zip(arrays["keys"], arrays["stamps"], arrays["odom"], arrays["sessions"]), start=1):
                if n > 1 and session != graph.session and graph.start_session() != session:
                    raise PoseGraphError(f"keyframe {key}: session {session} does not follow session {graph.session - 1}")
                graph.add_keyframe(int(key), float(stamp), T)
                while loop_i < n_loops and arrays["loop_after"][loop_i] == n:
                    (j, i), T_ji, cov = arrays["loop_keys"][loop_i], arrays["loop_T"][loop_i], arrays["loop_cov"][loop_i]
                    for name, k in (("match", j), ("query", i)):
                        if int(k) not in graph._index:
                            raise PoseGraphError(f"loop {loop_i} {name} key {k} is not a saved keyframe")
                    graph._offer(Loop(int(j), int(i), _check_transform(T_ji, f"loop {loop_i}"), _check_covariance(cov)))
                    loop_i += 1
            if loop_i != n_loops:
                raise PoseGraphError(f"loop order table is inconsistent ({n_loops - loop_i} loops never replayed)")
        except PoseGraphError as exc:
            raise PoseGraphError(f"{path}: {exc}") from None
        return graph


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Version 2 fields; a version 1 file (before sessions) reads as one session 0."""
    expected = ("config", "keys", "stamps", "odom", "loop_keys", "loop_T", "loop_cov", "loop_after")
    arrays = load_versioned_npz(path, FORMAT_NAME, (1, FORMAT_VERSION), expected, PoseGraphError, optional=("sessions",))
    arrays.setdefault("sessions", np.zeros(len(arrays["keys"]), dtype=np.int64))
    return arrays


def _check_saved_shapes(a: dict[str, np.ndarray], path: str | Path) -> None:
    n, m = len(a["keys"]), len(a["loop_after"])
    expected = {"keys": (n,), "stamps": (n,), "odom": (n, 4, 4), "sessions": (n,), "loop_keys": (m, 2), "loop_T": (m, 4, 4),
                "loop_cov": (m, 6, 6), "loop_after": (m,)}
    for name, shape in expected.items():
        if a[name].shape != shape:
            raise PoseGraphError(f"{path}: field {name} has shape {a[name].shape}, expected {shape}")
    if m and (np.any(np.diff(a["loop_after"]) < 0) or a["loop_after"][0] < 1 or a["loop_after"][-1] > n):
        raise PoseGraphError(f"{path}: loop order table is not within 1..{n} and sorted")

