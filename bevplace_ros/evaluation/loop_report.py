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


# Goals of a real-time replay on the 2-core machine (issue #14)
REALTIME_GOALS = {"keyframes_dropped": 0, "loop_latency_p95_ms": 1000.0, "place_ms_per_keyframe": 60.0, "registration_ms_per_candidate": 100.0}
PLACE_NODE, REGISTRATION_NODE = "/place_recognition_node", "/registration_node"


def percentiles_ms(values: list[float]) -> dict[str, float]:
    """count, p50, p95, max (and mean) of a list of milliseconds; count 0 alone when empty."""
    if not values:
        return {"count": 0}
    v = np.asarray(values, dtype=float)
    return {"count": len(v), "mean": round(float(v.mean()), 1), "p50": round(float(np.median(v)), 1),
            "p95": round(float(np.percentile(v, 95)), 1), "max": round(float(v.max()), 1)}


def _counter_sum(values: dict[str, str], prefix: str, exclude: tuple[str, ...] = ()) -> int:
    return sum(int(float(v)) for k, v in values.items() if k.startswith(prefix) and k not in exclude)


def realtime_summary(run, rate: float) -> dict:
    """What a real-time replay shows: per node CPU, memory and final /diagnostics counters; latency from each scan's
    publication to its keyframe and to each loop closure on it; per-stage times; output rates; the goals.

    `run` is a nodes.bag_replay.ReplayRun. Keyframes dropped: scans the place node dropped that could have been
    keyframes (every dropped.* counter but dropped.scans_behind, which only drops scans that would not be keyframes).
    """
    start, end = run.playback
    playback_s = max(end - start, 1e-9)
    sent = {round(ns * 1e-6): wall for ns, wall in run.scan_sent.items()}  # nodes keep stamps as float seconds: match to the ms
    loops = [(arrived - sent[ms]) * 1e3 for stamp, arrived, _ in run.closure_received if (ms := round(stamp * 1e-6)) in sent]
    verified = [(arrived - sent[ms]) * 1e3 for stamp, arrived, ok in run.closure_received if ok and (ms := round(stamp * 1e-6)) in sent]
    keyframes = [(run.keyframe_received[key] - sent[ms]) * 1e3 for key, stamp in run.keyframe_stamps.items()
                 if key in run.keyframe_received and (ms := round(stamp * 1e-6)) in sent]
    place = run.diagnostics.get(PLACE_NODE, {})
    registration = run.diagnostics.get(REGISTRATION_NODE, {})
    place_ms = {stat: float(place[f"latency.place_recognition.{stat}_ms"]) for stat in ("mean", "p95", "max")
                if f"latency.place_recognition.{stat}_ms" in place}
    registration_ms = percentiles_ms([c[4] for c in run.closures])
    nodes = {}
    for name in sorted(set(run.diagnostics) | {f"/{n}" for n in run.node_usage}):
        nodes[name] = {**run.node_usage.get(name.lstrip("/"), {}), "diagnostics": run.diagnostics.get(name, {})}
    rates = {topic: round((len(times) - 1) / (times[-1] - times[0]), 2) for topic, times in sorted(run.topic_received.items())
             if len(times) >= 2 and times[-1] > times[0]}
    received = _counter_sum(place, "received")
    summary = {
        "rate": rate,
        "playback_s": round(playback_s, 2),
        "scans_published": run.scans_published,
        "scan_hz": round(run.scans_published / playback_s, 2),
        "keyframes_per_s": round(len(run.keyframe_stamps) / playback_s, 2),
        "scans_received": received,
        # best-effort sensor QoS: scans the place node never saw (socket buffer or reader history overflow under load)
        "scans_not_received": run.scans_published - received,
        "scans_processed": _counter_sum(place, "processed"),
        "scans_dropped": _counter_sum(place, "dropped."),
        "keyframes_dropped": _counter_sum(place, "dropped.", exclude=("dropped.scans_behind",)),
        "candidates_dropped": _counter_sum(registration, "dropped."),
        "shed": {f"{name}: {k}": int(float(v)) for name, values in run.diagnostics.items() for k, v in values.items() if k.startswith("shed.")},
        "loop_latency_ms": percentiles_ms(loops),
        "verified_loop_latency_ms": percentiles_ms(verified),
        "keyframe_latency_ms": percentiles_ms(keyframes),
        "place_ms_per_keyframe": place_ms,
        "registration_ms_per_candidate": registration_ms,
        "output_hz": rates,
        "nodes": nodes,
        "unsettled": run.unsettled,  # non-empty: the nodes had not worked off their queues when the report was taken
    }
    # cores each stage needs to keep up with this input: arrivals per second x time per item (mean)
    candidates_per_s = _counter_sum(place, "candidates") / playback_s
    summary["core_demand"] = {
        "place_recognition": round(summary["keyframes_per_s"] * place_ms.get("mean", 0.0) / 1e3, 2),
        "registration": round(candidates_per_s * registration_ms.get("mean", 0.0) / 1e3, 2),
        "candidates_per_s": round(candidates_per_s, 2),
    }
    summary["goals"] = {
        "keyframes_dropped": [summary["keyframes_dropped"], summary["keyframes_dropped"] <= REALTIME_GOALS["keyframes_dropped"]],
        "loop_latency_p95_ms": [summary["loop_latency_ms"].get("p95"), summary["loop_latency_ms"].get("p95", np.inf) <= REALTIME_GOALS["loop_latency_p95_ms"]],
        "place_ms_per_keyframe (mean)": [place_ms.get("mean"), place_ms.get("mean", np.inf) <= REALTIME_GOALS["place_ms_per_keyframe"]],
        "registration_ms_per_candidate (p50)": [registration_ms.get("p50"), registration_ms.get("p50", np.inf) <= REALTIME_GOALS["registration_ms_per_candidate"]],
    }
    return summary


def format_realtime(rt: dict) -> str:
    """The real-time table: input, per node CPU / memory / problem counters, latencies, output rates, goals."""
    lines = [
        f"real time x{rt['rate']:g}: {rt['scans_published']} scans in {rt['playback_s']:.1f} s ({rt['scan_hz']:.1f} Hz), "
        f"keyframes {rt['keyframes_per_s']:.1f}/s; place node received {rt['scans_received']} (not received {rt['scans_not_received']}), processed {rt['scans_processed']}, "
        f"dropped {rt['scans_dropped']} (keyframes {rt['keyframes_dropped']}); candidates dropped {rt['candidates_dropped']}",
        *([f"PARTIAL: {rt['unsettled']}"] if rt.get("unsettled") else []),
        "",
        f"{'node':<26}{'cpu %':>8}{'cpu s':>8}{'after s':>9}{'peak MiB':>10}  problems (dropped.*, skipped.*, shed.*, lost)",
    ]
    for name, node in rt["nodes"].items():
        problems = ", ".join(f"{k} {v}" for k, v in node["diagnostics"].items()
                             if k.startswith(("dropped.", "skipped.", "shed.", "lost")) and v not in ("0", "0.0")) or "none"
        usage = [f"{node[k]:>{w}.1f}" if k in node else f"{'-':>{w}}" for k, w in (("cpu_percent", 8), ("cpu_s", 8), ("cpu_s_after_input", 9), ("peak_rss_mib", 10))]
        lines.append(f"{name.lstrip('/'):<26}{''.join(usage)}  {problems}")
    lines += ["", f"{'latency [ms]':<36}{'count':>7}{'p50':>9}{'p95':>9}{'max':>9}"]
    for label, key in (("scan -> loop closure (any)", "loop_latency_ms"), ("scan -> verified loop closure", "verified_loop_latency_ms"),
                       ("scan -> keyframe", "keyframe_latency_ms"), ("registration per candidate", "registration_ms_per_candidate")):
        stats = rt[key]
        lines.append(f"{label:<36}{stats['count']:>7}" + "".join(f"{stats[s]:>9.1f}" if s in stats else f"{'-':>9}" for s in ("p50", "p95", "max")))
    place = rt["place_ms_per_keyframe"]
    if place:
        lines.append(f"{'place per keyframe (mean, /diagnostics)':<36}{'':>7}{place.get('mean', float('nan')):>9.1f}"
                     f"{place.get('p95', float('nan')):>9.1f}{place.get('max', float('nan')):>9.1f}")
    demand = rt["core_demand"]
    lines += ["", f"cores needed to keep up: place {demand['place_recognition']:.2f} ({rt['keyframes_per_s']:.1f} keyframes/s x mean time), "
                  f"registration {demand['registration']:.2f} ({demand['candidates_per_s']:.1f} candidates/s published x mean time)"]
    lines += ["", "output rates [Hz]: " + (", ".join(f"{t} {hz:.2f}" for t, hz in rt["output_hz"].items()) or "none"),
              "goals: " + "; ".join(f"{name} {value} {'met' if ok else 'NOT met'}" for name, (value, ok) in rt["goals"].items())]
    return "\n".join(lines)
