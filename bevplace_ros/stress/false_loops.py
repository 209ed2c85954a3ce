"""Wrong loops: inject false candidates in a repetitive world and count what each safeguard lets through.

Safeguards, in the order a candidate meets them: the registrar's own verdict (fitness, inliers),
the verifier's second geometric check (region overlap / BEV agreement, LoopVerifier.second_check),
then the pose graph's sanity cap against the odometry prior and its robust kernel. Every candidate
is registered once; the graph is then rebuilt for each combination of safeguards, so the figures
show which check alone is fooled and which pair is not.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from bevplace_ros.stress.repetitive_world import CorridorConfig, CorridorDrive, corridor_drive

FALSE_MIN_DISTANCE_M = 20.0  # a false candidate joins keyframes at least this far apart (ground truth)
TRUE_MAX_DISTANCE_M = 5.0  # a revisit: nearest earlier keyframe within this distance
MIN_ARC_GAP_M = 50.0  # candidates only join keyframes this far apart along the drive (retrieval's recency window)


@dataclass(frozen=True)
class FalseLoopConfig:
    corridor: CorridorConfig = field(default_factory=CorridorConfig)
    true_candidates: int = 30  # revisit candidates (subsampled evenly)
    false_share: float = 0.5  # share of all candidates that are false; half repetitive, half random pairs
    seed: int = 0

    def __post_init__(self) -> None:
        if self.true_candidates < 1 or not 0.1 <= self.false_share < 1.0:
            raise ValueError(f"need true_candidates >= 1 and false_share in [0.1, 1), got {self.true_candidates}, {self.false_share}")


@dataclass(frozen=True)
class CandidateOutcome:
    query: int
    match: int
    kind: str  # "true", "repetitive" or "random"
    registered: bool  # the registrar's own verdict
    second_check: str  # rejection reason of the second check; empty when it passes
    transform: np.ndarray
    covariance_ros: np.ndarray


@dataclass(frozen=True)
class FalseLoopReport:
    keyframes: int
    true_candidates: int
    false_injected: int
    false_passing_registration: int
    false_passing_both_checks: int
    true_passing_both_checks: int
    graph: dict[str, dict[str, float]]  # safeguard set -> {"false_loops", "true_loops", "ate_m"}
    ate_odometry_m: float

    def ate_change(self) -> float:
        """Relative ATE change of the full pipeline with false candidates vs the clean run."""
        clean = self.graph["clean"]["ate_m"]
        return (self.graph["full pipeline"]["ate_m"] - clean) / clean


def make_candidates(drive: CorridorDrive, cfg: FalseLoopConfig) -> list[tuple[int, int, str]]:
    """(query, match, kind): subsampled true revisits, plus repetitive and random false pairs."""
    rng = np.random.default_rng(cfg.seed)
    xy = drive.gt[:, :2, 3]
    true: list[tuple[int, int, str]] = []
    for q in range(len(drive)):
        earlier = np.nonzero(drive.arc < drive.arc[q] - MIN_ARC_GAP_M)[0]
        if len(earlier):
            j = earlier[np.argmin(np.linalg.norm(xy[earlier] - xy[q], axis=1))]
            if np.linalg.norm(xy[j] - xy[q]) <= TRUE_MAX_DISTANCE_M:
                true.append((q, int(j), "true"))
    true = [true[i] for i in np.linspace(0, len(true) - 1, min(cfg.true_candidates, len(true))).round().astype(int)]
    n_false = int(np.ceil(len(true) * cfg.false_share / (1 - cfg.false_share)))
    return true + _repetitive(drive, true, n_false - n_false // 2, rng) + _random(drive, n_false // 2, rng)


def _repetitive(drive: CorridorDrive, true: list, n: int, rng: np.random.Generator) -> list[tuple[int, int, str]]:
    """For revisit queries, the earlier keyframe whole periods further along the street: same view, wrong place."""
    xy, period = drive.gt[:, :2, 3], drive.config.period_m
    out = []
    for q, _, _ in (true[i] for i in rng.permutation(len(true))):
        earlier = np.nonzero(drive.arc < drive.arc[q] - MIN_ARC_GAP_M)[0]
        for shift in rng.permutation([-1, 1, -2, 2]):
            target = xy[q] + shift * period * drive.heading[q]
            j = earlier[np.argmin(np.linalg.norm(xy[earlier] - target, axis=1))]
            if np.linalg.norm(xy[j] - target) < 3.0 and np.linalg.norm(xy[j] - xy[q]) >= FALSE_MIN_DISTANCE_M:
                out.append((q, int(j), "repetitive"))
                break
        if len(out) == n:
            break
    return out


def _random(drive: CorridorDrive, n: int, rng: np.random.Generator) -> list[tuple[int, int, str]]:
    xy, out = drive.gt[:, :2, 3], []
    while len(out) < n:
        q, j = sorted(rng.integers(len(drive), size=2))[::-1]
        if drive.arc[q] - drive.arc[j] >= MIN_ARC_GAP_M and np.linalg.norm(xy[q] - xy[j]) >= FALSE_MIN_DISTANCE_M:
            out.append((int(q), int(j), "random"))
    return out


def register_candidates(drive: CorridorDrive, candidates: list[tuple[int, int, str]], registration_overrides: dict) -> list[CandidateOutcome]:
    """Register every candidate with the product's LoopVerifier (registrar verdict and second check kept apart)."""
    from bevplace_ros.keyframe_store import KeyframeStoreConfig
    from bevplace_ros.loop_verifier import LoopVerifier, LoopVerifierConfig
    from bevplace_ros.registration import RegistrationConfig

    verifier = LoopVerifier(LoopVerifierConfig(use_bev_prior=False), RegistrationConfig(**registration_overrides), KeyframeStoreConfig())
    out = []
    for q, j, kind in candidates:
        for key in (q, j):
            if key not in verifier.clouds:
                verifier.add_keyframe(key, drive.scan(key))
        result = verifier.register(q, j)
        reason = verifier.second_check(result.transform, q, j) if result.verified else "not registered"
        out.append(CandidateOutcome(q, j, kind, bool(result.verified), reason, result.transform, result.covariance_ros()))
    return out


def graph_run(drive: CorridorDrive, loops: list[CandidateOutcome], graph_cfg) -> tuple[set[tuple[int, int]], float]:
    """Replay the drive into a PoseGraph, each loop arriving with its query keyframe; (accepted, ATE [m])."""
    from bevplace_ros.evaluation.trajectory import ate_rmse
    from bevplace_ros.pose_graph import PoseGraph

    graph = PoseGraph(graph_cfg)
    by_query: dict[int, list[CandidateOutcome]] = {}
    for loop in loops:
        by_query.setdefault(loop.query, []).append(loop)
    for key in range(len(drive)):
        graph.add_keyframe(key, float(drive.arc[key]), drive.odom[key])
        for loop in by_query.get(key, []):
            graph.add_loop(loop.match, loop.query, loop.transform, loop.covariance_ros)
    poses = graph.optimized_poses()
    estimate = np.stack([poses[k] for k in range(len(drive))])
    return {(lp.query_key, lp.match_key) for lp in graph.loops()}, ate_rmse(estimate, drive.gt_map())


def run_false_loops(cfg: FalseLoopConfig, registration_overrides: dict) -> tuple[FalseLoopReport, list[CandidateOutcome]]:
    from bevplace_ros.evaluation.trajectory import ate_rmse
    from bevplace_ros.pose_graph import PoseGraphConfig

    drive = corridor_drive(cfg.corridor)
    outcomes = register_candidates(drive, make_candidates(drive, cfg), registration_overrides)
    registered = [o for o in outcomes if o.registered]
    both = [o for o in registered if not o.second_check]
    no_cap = replace(PoseGraphConfig(), max_loop_translation=float("inf"), max_loop_rotation_deg=float("inf"))
    runs = {
        "clean": ([o for o in both if o.kind == "true"], PoseGraphConfig()),
        "registration + graph cap/kernel": (registered, PoseGraphConfig()),
        "both checks + kernel only (no cap)": (both, no_cap),
        "full pipeline": (both, PoseGraphConfig()),
    }
    kinds = {(o.query, o.match): o.kind for o in outcomes}
    graph = {}
    for name, (loops, graph_cfg) in runs.items():
        accepted, ate = graph_run(drive, loops, graph_cfg)
        false = sum(kinds[pair] != "true" for pair in accepted)
        graph[name] = {"false_loops": false, "true_loops": len(accepted) - false, "ate_m": ate}
    false = [o for o in outcomes if o.kind != "true"]
    report = FalseLoopReport(
        keyframes=len(drive), true_candidates=len(outcomes) - len(false), false_injected=len(false),
        false_passing_registration=sum(o.registered for o in false), false_passing_both_checks=sum(not o.second_check for o in false),
        true_passing_both_checks=sum(o.kind == "true" for o in both), graph=graph, ate_odometry_m=ate_rmse(drive.odom, drive.gt_map()),
    )
    return report, outcomes
