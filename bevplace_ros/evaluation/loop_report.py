"""Judge a run's loop closures and trajectories against ground truth, and draw them.

A verified loop counts as true when its relative pose agrees with the ground truth within the
registration-success bounds of the KITTI protocol (RTE < 2 m, RRE < 5 deg): a loop between the
right places with a wrong pose is still a false loop for a pose graph.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bevplace_ros.atomic_io import atomic_write
from bevplace_ros.evaluation.trajectory import ate_rmse
from bevplace_ros.se3 import invert, rotation_error_deg, translation_error

TRUE_LOOP_RTE_M = 2.0
TRUE_LOOP_RRE_DEG = 5.0


@dataclass(frozen=True)
class LoopOutcome:
    query_id: int
    match_id: int
    verified: bool
    true_loop: bool | None  # None without ground truth
    rte_m: float | None
    rre_deg: float | None


def judge_loops(closures: list[tuple[int, int, np.ndarray, bool]], gt: dict[int, np.ndarray]) -> list[LoopOutcome]:
    """closures: (query_id, match_id, T_match_query, verified); gt: keyframe id -> T_map_sensor."""
    outcomes = []
    for query, match, T, verified in closures:
        if query in gt and match in gt:
            T_gt = invert(gt[match]) @ gt[query]
            rte, rre = translation_error(T, T_gt), rotation_error_deg(T, T_gt)
            true = rte < TRUE_LOOP_RTE_M and rre < TRUE_LOOP_RRE_DEG
            outcomes.append(LoopOutcome(query, match, verified, true, rte, rre))
        else:
            outcomes.append(LoopOutcome(query, match, verified, None, None, None))
    return outcomes


def revisiting_keyframes(gt: dict[int, np.ndarray], radius_m: float, exclude_recent: int) -> list[int]:
    """Keyframes with an earlier keyframe (beyond the exclusion window) within `radius_m`: the loops to find."""
    keys = sorted(gt)
    positions = np.array([gt[k][:3, 3] for k in keys])
    found = []
    for i, key in enumerate(keys):
        earlier = positions[: max(i - exclude_recent, 0)]
        if len(earlier) and np.min(np.linalg.norm(earlier - positions[i], axis=1)) < radius_m:
            found.append(key)
    return found


def summarize(outcomes: list[LoopOutcome], revisits: list[int], odom: dict[int, np.ndarray], optimized: dict[int, np.ndarray],
              gt: dict[int, np.ndarray], graph_loops: set[tuple[int, int]] | None = None) -> dict:
    """Counts and ATE; `graph_loops` (query, match) are the loops the pose graph took, when known."""
    verified = [o for o in outcomes if o.verified]
    true_verified = [o for o in verified if o.true_loop]
    found = {o.query_id for o in true_verified}
    keys = [k for k in sorted(gt) if k in odom and k in optimized]
    summary = {
        "candidates": len(outcomes),
        "verified_loops": len(verified),
        "true_loops": len(true_verified),
        "false_loops": sum(1 for o in verified if o.true_loop is False),
        "rejected_true_candidates": sum(1 for o in outcomes if not o.verified and o.true_loop),
        "revisiting_keyframes": len(revisits),
        "revisits_closed": len(found & set(revisits)),
        "loops": [asdict(o) for o in outcomes],
    }
    if graph_loops is not None:
        taken = [o for o in verified if (o.query_id, o.match_id) in graph_loops]
        summary["graph_loops"] = len(taken)
        summary["graph_false_loops"] = sum(1 for o in taken if o.true_loop is False)
    if len(keys) >= 3:
        ref = np.array([gt[k] for k in keys])
        summary["ate_odometry_m"] = ate_rmse(np.array([odom[k] for k in keys]), ref)
        summary["ate_optimized_m"] = ate_rmse(np.array([optimized[k] for k in keys]), ref)
    return summary


def plot_run(path: str | Path, gt: dict[int, np.ndarray], odom: dict[int, np.ndarray], optimized: dict[int, np.ndarray], outcomes: list[LoopOutcome]) -> Path:
    """Top view of ground truth, odometry and optimised keyframe positions with the verified loops."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 8))
    for poses, style, label in ((gt, "k-", "ground truth"), (odom, "r--", "odometry"), (optimized, "b-", "optimised")):
        if poses:
            xy = np.array([poses[k][:2, 3] for k in sorted(poses)])
            axis.plot(xy[:, 0], xy[:, 1], style, lw=1.2, label=label)
    for outcome in (o for o in outcomes if o.verified and o.query_id in optimized and o.match_id in optimized):
        a, b = optimized[outcome.match_id][:2, 3], optimized[outcome.query_id][:2, 3]
        axis.plot([a[0], b[0]], [a[1], b[1]], "-", color="red" if outcome.true_loop is False else "green", lw=1.0)
    axis.plot([], [], "g-", label="verified loop (true)")
    axis.plot([], [], "r-", label="verified loop (false)")
    return save_top_view(path, figure, axis, "x [m]")


def save_top_view(path: str | Path, figure, axis, xlabel: str) -> Path:
    """Label, legend and grid of a top-view trajectory plot, then the PNG written atomically."""
    import matplotlib.pyplot as plt

    axis.set_aspect("equal")
    axis.set_xlabel(xlabel)
    axis.set_ylabel("y [m]")
    axis.legend(loc="best")
    axis.grid(alpha=0.3)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(figure)
    return Path(path)


def format_report(summary: dict) -> str:
    """The end-of-run table a user reads: loops, per-stage latency, ATE."""
    lines = [
        f"scans {summary.get('scans', 0)}, keyframes {summary.get('keyframes', 0)}, wall time {summary.get('wall_s', 0.0):.1f} s",
        f"loop candidates {summary['candidates']}: verified {summary['verified_loops']} "
        f"(true {summary['true_loops']}, false {summary['false_loops']}), true candidates rejected {summary['rejected_true_candidates']}",
        f"revisiting keyframes closed: {summary['revisits_closed']} of {summary['revisiting_keyframes']}",
        *([f"pose graph took {summary['graph_loops']} loops, {summary['graph_false_loops']} of them false"] if "graph_loops" in summary else []),
        "",
        f"{'stage':<20}{'count':>7}{'mean ms':>10}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}",
    ]
    for stage, values in summary.get("latency_ms", {}).items():
        if values:
            v = np.asarray(values)
            lines.append(f"{stage:<20}{len(v):>7}{v.mean():>10.1f}{np.median(v):>10.1f}{np.percentile(v, 95):>10.1f}{v.max():>10.1f}")
    if "ate_odometry_m" in summary:
        lines += ["", f"ATE (keyframes, SE(3)-aligned): odometry {summary['ate_odometry_m']:.3f} m -> optimised {summary['ate_optimized_m']:.3f} m"]
    return "\n".join(lines)
