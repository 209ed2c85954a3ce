"""Multi-session figures: a simulated world mapped in one run, then runs starting at random places in
it (some outside the mapped part), each in its own drifting odometry frame, replayed against the
saved map. Per run: relocalised or not, distance and time driven before, whether the anchor was
false, and the run's ATE in the map frame (no alignment) with the anchor alone and after joining.

The map frame is the map run's odometry frame (the pose graph's prior pins its first keyframe at
its odometry pose), so ground truth goes into it through the map run's first keyframe.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bevplace_ros.evaluation.trajectory import ate_rmse
from bevplace_ros.se3 import invert, rotation_error_deg, translation_error

# Three suburban blocks in a row; the map run drives round the left two and down their middle road,
# so the right block is never mapped.
MAP_ROUTE = ((0, 0), (1, 0), (2, 0), (2, 1), (1, 1), (0, 1), (0, 0), (1, 0), (1, 1))
START_TIME_S = 1_700_000_000
SESSION_CLOCK_STEP_S = 100_000  # each run's clock starts this much after the previous one's: another day
FALSE_ANCHOR_M, FALSE_ANCHOR_DEG = 5.0, 10.0  # anchor error (map's own drift included) that counts as false
OUTSIDE_M = 10.0  # a run starts outside the map when no map keyframe lies within this


@dataclass(frozen=True)
class SessionsConfig:
    seed: int = 0
    sessions: int = 10
    session_length_m: float = 160.0  # random walk per run
    blocks_x: int = 3


def map_sequence_config(cfg: SessionsConfig):
    from bevplace_ros.sim.presets import preset_config, with_overrides

    return with_overrides(preset_config("demo", seed=cfg.seed), **{"trajectory.route": MAP_ROUTE, "world.blocks_x": cfg.blocks_x})


def session_sequence_config(cfg: SessionsConfig, index: int):
    """Run `index`: same world, a seeded random walk from a random intersection, its own odometry drift and sensor noise."""
    base = map_sequence_config(cfg)
    seed = 1000 * (cfg.seed + 1) + index
    return replace(base, trajectory=replace(base.trajectory, route=None, seed=seed, length_m=cfg.session_length_m),
                   odometry=replace(base.odometry, seed=seed), seed=seed)


def write_bag(sequence, folder: Path, clock_index: int) -> Path:
    """The run's rosbag2, written once (the same config always gives the same bytes)."""
    from bevplace_ros.sim.writers import BagConfig, write_sequence

    if not (folder / "metadata.yaml").is_file():
        write_sequence(sequence, folder, None, BagConfig(start_time_s=START_TIME_S + clock_index * SESSION_CLOCK_STEP_S))
    return folder


def world_poses(sequence, keyframe_stamps_ns: dict[int, int], clock_index: int) -> dict[int, np.ndarray]:
    """Keyframe id -> T_world_lidar, matching keyframes to the sequence by stamp."""
    by_ms = {round((START_TIME_S + clock_index * SESSION_CLOCK_STEP_S + t) * 1e3): i for i, t in enumerate(sequence.stamps)}
    gt = sequence.gt_lidar(sequence.stamps)
    return {key: gt[by_ms[round(ns * 1e-6)]] for key, ns in keyframe_stamps_ns.items() if round(ns * 1e-6) in by_ms}


def session_metrics(run, gt_world: dict[int, np.ndarray], T_map_world: np.ndarray, map_positions: np.ndarray) -> dict[str, Any]:
    """Figures of one replayed run against the loaded map (session 1 of the run's graph)."""
    keys = sorted(gt_world)
    truth = {k: T_map_world @ gt_world[k] for k in keys}
    xy = np.array([gt_world[k][:3, 3] for k in keys])
    travelled = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(xy, axis=0), axis=1))]
    start_gap = float(np.min(np.linalg.norm(map_positions - xy[0], axis=1)))
    out: dict[str, Any] = {"keyframes": len(keys), "length_m": float(travelled[-1]), "starts_outside_map": start_gap > OUTSIDE_M,
                           "start_distance_to_map_m": start_gap, "relocalised": False, "wall_s": run.wall_s}
    anchoring = run.anchorings.get(1)
    if anchoring is None:
        return out
    n_map = sum(1 for s in run.sessions.values() if s == 0)
    at = anchoring.after - n_map - 1  # the keyframe whose loop anchored the run
    stamps = np.array([run.keyframe_stamps[k] for k in keys]) * 1e-9
    key_at = keys[at]
    anchor_pose = anchoring.T_map_odom @ run.odometry[key_at]
    joined = [k for k in keys if k in run.map_poses]
    out.update(
        relocalised=True, anchor_keyframe=at, wrong_hypotheses_dropped=anchoring.dropped, distance_before_m=float(travelled[at]), time_before_s=float(stamps[at] - stamps[0]),
        anchor_error_m=translation_error(anchor_pose, truth[key_at]), anchor_error_deg=rotation_error_deg(anchor_pose, truth[key_at]),
        ate_anchor_only_m=ate_rmse(np.array([anchoring.T_map_odom @ run.odometry[k] for k in keys]), np.array([truth[k] for k in keys]), align=False),
        ate_joined_m=ate_rmse(np.array([run.map_poses[k] for k in joined]), np.array([truth[k] for k in joined]), align=False),
    )
    out["false_anchoring"] = out["anchor_error_m"] > FALSE_ANCHOR_M or out["anchor_error_deg"] > FALSE_ANCHOR_DEG
    return out


def plot_sessions(path: str | Path, sessions: dict[int, int], map_poses: dict[int, np.ndarray], loops: set[tuple[int, int]],
                  truth: dict[int, np.ndarray] | None = None) -> Path:
    """Top view of every anchored session's keyframes in the map frame, inter-session loops drawn between them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bevplace_ros.evaluation.loop_report import save_top_view

    figure, axis = plt.subplots(figsize=(8, 8))
    if truth:
        xy = np.array([truth[k][:2, 3] for k in sorted(truth)])
        axis.plot(xy[:, 0], xy[:, 1], "k:", lw=1.0, label="ground truth (this run)")
    for session in sorted(set(sessions.values())):
        keys = [k for k in sorted(map_poses) if sessions.get(k) == session]
        if keys:
            xy = np.array([map_poses[k][:2, 3] for k in keys])
            axis.plot(xy[:, 0], xy[:, 1], "-", lw=1.4, label=f"session {session}")
    for query, match in loops:
        if query in map_poses and match in map_poses and sessions.get(query) != sessions.get(match):
            a, b = map_poses[match][:2, 3], map_poses[query][:2, 3]
            axis.plot([a[0], b[0]], [a[1], b[1]], "m-", lw=1.0)
    axis.plot([], [], "m-", label="inter-session loop")
    return save_top_view(path, figure, axis, "x [m] (map frame)")


def session_lines(sessions: dict[int, int], anchorings: dict[int, Any]) -> list[str]:
    """One line per session of a replayed graph: keyframes, and how it joined the map."""
    lines = []
    for session in sorted(set(sessions.values())):
        keys = [k for k, s in sessions.items() if s == session]
        how = ("defines the map frame" if session == min(sessions.values()) and session not in anchorings else
               f"anchored by loops from keyframes {sorted(set(anchorings[session].query_keys))}" if session in anchorings else
               "not anchored (no map->odom)")
        lines.append(f"session {session}: keyframes {min(keys)}..{max(keys)} ({len(keys)}), {how}")
    return lines


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    joined = [r for r in rows if r["relocalised"]]
    mean = lambda name: float(np.mean([r[name] for r in joined])) if joined else None  # noqa: E731
    return {"sessions": len(rows), "relocalised": len(joined), "false_anchorings": sum(r.get("false_anchoring", False) for r in rows),
            "starting_outside": sum(r["starts_outside_map"] for r in rows),
            "wrong_hypotheses_dropped": sum(r.get("wrong_hypotheses_dropped", 0) for r in rows), "mean_distance_before_m": mean("distance_before_m"),
            "mean_time_before_s": mean("time_before_s"), "mean_ate_anchor_only_m": mean("ate_anchor_only_m"),
            "mean_ate_joined_m": mean("ate_joined_m")}


def format_table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    lines = [f"{'run':>3} {'outside':>7} {'start gap m':>11} {'reloc':>5} {'dist m':>7} {'time s':>7} {'anchor err m/deg':>16} "
             f"{'false':>5} {'dropped':>7} {'ATE anchor m':>12} {'ATE joined m':>12}"]
    for i, r in enumerate(rows):
        if r["relocalised"]:
            tail = (f"{r['distance_before_m']:>7.1f} {r['time_before_s']:>7.1f} {r['anchor_error_m']:>9.2f}/{r['anchor_error_deg']:<6.2f} "
                    f"{'yes' if r['false_anchoring'] else 'no':>5} {r['wrong_hypotheses_dropped']:>7} "
                    f"{r['ate_anchor_only_m']:>12.2f} {r['ate_joined_m']:>12.2f}")
        else:
            tail = f"{'-':>7} {'-':>7} {'-':>16} {'-':>5} {'-':>7} {'-':>12} {'-':>12}"
        lines.append(f"{i:>3} {'yes' if r['starts_outside_map'] else 'no':>7} {r['start_distance_to_map_m']:>11.1f} "
                     f"{'yes' if r['relocalised'] else 'no':>5} {tail}")
    s = summary
    lines.append(f"relocalised {s['relocalised']} of {s['sessions']} ({s['starting_outside']} starting outside the map), "
                 f"false anchorings {s['false_anchorings']}, held hypotheses dropped as inconsistent {s['wrong_hypotheses_dropped']}")
    if s["relocalised"]:
        lines.append(f"mean before relocalising: {s['mean_distance_before_m']:.1f} m, {s['mean_time_before_s']:.1f} s; "
                     f"mean ATE in the map frame: anchor only {s['mean_ate_anchor_only_m']:.2f} m -> joined {s['mean_ate_joined_m']:.2f} m")
    return "\n".join(lines)


def evaluate_sessions(cfg: SessionsConfig, out: Path, params_file: Path | None, progress: bool = True) -> dict[str, Any]:
    """Map run (skipped when `out/map` holds one), then each run replayed in lock-step against the saved
    map; writes sessions.json and one plot per run."""
    from bevplace_ros.atomic_io import atomic_write_bytes
    from bevplace_ros.nodes.bag_replay import ReplayOptions, replay
    from bevplace_ros.pose_graph import PoseGraph
    from bevplace_ros.sim.sequence import simulate_sequence

    out.mkdir(parents=True, exist_ok=True)
    map_seq = simulate_sequence(map_sequence_config(cfg))
    map_bag = write_bag(map_seq, out / "bags" / "map", 0)
    map_dir = out / "map"
    if not (map_dir / "graph.npz").is_file():
        replay(ReplayOptions(bag=map_bag, params_file=params_file, record=None, save_map=map_dir, progress=progress))
    graph = PoseGraph.load(map_dir / "graph.npz")
    map_gt = world_poses(map_seq, {k: round(t * 1e9) for k, t in graph.stamps().items()}, 0)
    first = min(map_gt)
    T_map_world = graph.odometry_poses()[first] @ invert(map_gt[first])
    map_positions = np.array([T[:3, 3] for T in map_gt.values()])
    optimized = graph.optimized_poses()
    map_ate = ate_rmse(np.array([optimized[k] for k in sorted(map_gt)]), np.array([T_map_world @ map_gt[k] for k in sorted(map_gt)]), align=False)
    rows = []
    for i in range(cfg.sessions):
        seq = simulate_sequence(session_sequence_config(cfg, i))
        bag = write_bag(seq, out / "bags" / f"run{i:02d}", i + 1)
        run = replay(ReplayOptions(bag=bag, params_file=params_file, record=None, load_map=map_dir, progress=progress))
        gt = world_poses(seq, run.keyframe_stamps, i + 1)
        row = session_metrics(run, gt, T_map_world, map_positions)
        rows.append(row)
        plot_sessions(out / f"run{i:02d}.png", run.sessions, run.map_poses, run.graph_loops or set(),
                      {k: T_map_world @ T for k, T in gt.items()})
        print(f"run {i}: " + json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    summary = summarize(rows)
    report = {"config": asdict(cfg), "map_keyframes": len(map_gt), "map_ate_m": map_ate, "summary": summary, "runs": rows,
              "thresholds": {"false_anchor_m": FALSE_ANCHOR_M, "false_anchor_deg": FALSE_ANCHOR_DEG, "outside_m": OUTSIDE_M}}
    atomic_write_bytes(out / "sessions.json", json.dumps(report, indent=2).encode())
    return report


# ----------------------------------------------------------------- KITTI BEV images
KITTI_LOOP_SIGMAS = (0.5, 0.5, 1.0, 2.0, 2.0, 2.0)  # x, y, z [m], roll, pitch, yaw [deg] of a BEV-image loop
KITTI_YAW_DRIFT_DEG_PER_M = 0.02  # the query run's simulated odometry heading drift
TRUE_LOOP_M, TRUE_LOOP_DEG = 2.0, 5.0


@dataclass(frozen=True)
class KittiSessionsConfig:
    db_end: int  # database frames [0, db_end) are the map, query frames [query_start, end) the second run
    query_start: int
    step: int = 3  # every step-th frame is a keyframe
    top_k: int = 3
    min_inliers: int = 15  # BEV-pose inliers a loop needs (there are no scans to register)
    exclude_recent: int = 50  # within the query run (its own revisits)


def kitti_sessions(folder: Path, cfg: KittiSessionsConfig, anchor_loops: tuple[int, ...] = (2, 1)) -> dict[str, Any]:
    """The query frames of a KITTI BEV sequence as a second run against its database frames.

    The published BEV images come without scans, so a loop is the BEV 3-DoF pose between the two
    images (re-ranked by inliers) instead of a registration: a weaker check than the pipeline's.
    The map is the database frames at their ground-truth poses; the run's odometry is its ground
    truth with a heading drift, in a frame of its own. The same loops go into graphs that anchor
    after each of `anchor_loops` agreeing loops, to show what the second loop buys.
    """
    from bevplace_ros.bev_pose import estimate_pose
    from bevplace_ros.datasets.bev_images import BEVImageFolder
    from bevplace_ros.descriptor_db import DatabaseConfig, DescriptorDatabase
    from bevplace_ros.place_recognizer import PlaceRecognizer

    seq = BEVImageFolder(folder)
    gt = _rigid(seq.poses)
    db_frames, query_frames = np.arange(0, cfg.db_end, cfg.step), np.arange(cfg.query_start, len(seq), cfg.step)
    recognizer = PlaceRecognizer()
    keypoints, descriptors = {}, {}
    frames = np.r_[db_frames, query_frames]
    for start in range(0, len(frames), 32):  # keep descriptors and keypoints only: feature maps are large
        chunk = frames[start:start + 32]
        for frame, f in zip(chunk, recognizer.describe_images(seq.images(chunk))):
            keypoints[int(frame)], descriptors[int(frame)] = f.keypoints, f.descriptor
    database = DescriptorDatabase(DatabaseConfig(dim=recognizer.descriptor_dim))
    database.add_batch(db_frames, db_frames.astype(float), np.array([descriptors[int(f)] for f in db_frames]), session=0)
    loops = []  # (query frame, match frame, T_match_query, true)
    for frame in query_frames:
        descriptor = descriptors[int(frame)]
        for match in database.query(descriptor, float(frame), cfg.top_k, cfg.exclude_recent, session=1):
            pose = estimate_pose(keypoints[match.keyframe_id], keypoints[int(frame)], recognizer.cfg.pose)
            if pose is not None and pose.inliers >= cfg.min_inliers:
                T = pose.matrix()
                T_true = invert(gt[match.keyframe_id]) @ gt[frame]
                true = translation_error(T, T_true) < TRUE_LOOP_M and rotation_error_deg(T, T_true) < TRUE_LOOP_DEG
                loops.append((int(frame), match.keyframe_id, T, true))
        database.add(int(frame), float(frame), descriptor, session=1)
    odom = _drifting_odometry(gt[query_frames])
    return {"frames": {"map": len(db_frames), "run": len(query_frames)}, "loops": len(loops), "false_loops": sum(not t for *_, t in loops),
            "by_anchor_loops": {n: _kitti_graph(gt, db_frames, query_frames, odom, loops, n) for n in anchor_loops}}


def _rigid(poses: np.ndarray) -> np.ndarray:
    """Nearest rotations (SVD): KITTI's 12-digit text poses drift off orthonormal when chained."""
    u, _, vt = np.linalg.svd(poses[:, :3, :3])
    out = poses.copy()
    out[:, :3, :3] = u @ vt
    return out


def _drifting_odometry(gt: np.ndarray) -> np.ndarray:
    """The run's odometry: its true motion with a heading drift per metre, from an arbitrary frame."""
    from bevplace_ros.se3 import make_transform, xyyaw_to_matrix

    odom = [xyyaw_to_matrix(50.0, -20.0, 2.0)]
    for a, b in zip(gt[:-1], gt[1:]):
        step = invert(a) @ b
        drift = np.radians(KITTI_YAW_DRIFT_DEG_PER_M * np.linalg.norm(step[:3, 3]))
        odom.append(odom[-1] @ step @ make_transform(xyyaw_to_matrix(0, 0, drift)[:3, :3], np.zeros(3)))
    return _rigid(np.array(odom))


def _kitti_graph(gt, db_frames, query_frames, odom, loops, anchor_loops: int) -> dict[str, Any]:
    from bevplace_ros.pose_graph import PoseGraph, PoseGraphConfig

    graph = PoseGraph(PoseGraphConfig(anchor_loops=anchor_loops))
    for frame in db_frames:
        graph.add_keyframe(int(frame), float(frame), gt[frame])
    graph.start_session()
    covariance = np.diag(np.square(np.r_[KITTI_LOOP_SIGMAS[:3], np.radians(KITTI_LOOP_SIGMAS[3:])]))
    by_query: dict[int, list] = {}
    for query, match, T, true in loops:
        by_query.setdefault(query, []).append((match, T, true))
    taken_false = 0
    for i, frame in enumerate(query_frames):
        graph.add_keyframe(int(frame), float(frame), odom[i])
        for match, T, true in by_query.get(int(frame), []):
            taken_false += (graph.add_loop(match, int(frame), T, covariance).accepted and not true)
    out: dict[str, Any] = {"anchored": graph.anchored(1), "false_loops_in_graph": taken_false}
    anchoring = graph.anchorings().get(1)
    if anchoring is None:
        return out
    at = anchoring.after - len(db_frames) - 1
    xy = gt[query_frames][:, :3, 3]
    travelled = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(xy, axis=0), axis=1))]
    anchor_pose = anchoring.T_map_odom @ odom[at]
    poses = graph.optimized_poses()
    out.update(distance_before_m=float(travelled[at]), frames_before=at,
               anchor_error_m=translation_error(anchor_pose, gt[query_frames[at]]),
               anchor_error_deg=rotation_error_deg(anchor_pose, gt[query_frames[at]]),
               ate_anchor_only_m=ate_rmse(anchoring.T_map_odom @ odom, gt[query_frames], align=False),
               ate_joined_m=ate_rmse(np.array([poses[int(f)] for f in query_frames]), gt[query_frames], align=False))
    out["false_anchoring"] = out["anchor_error_m"] > FALSE_ANCHOR_M or out["anchor_error_deg"] > FALSE_ANCHOR_DEG
    return out
