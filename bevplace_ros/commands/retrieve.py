"""`bevplace-ros retrieve`: the place pipeline offline, one database frame (or -1) per query frame.

The same steps and defaults as the place node: descriptor retrieval of `rerank_k` places, BEV
re-ranking by geometric inliers, `min_inliers` rejection, `max_descriptor_distance` cut; only
the recency exclusions are left out, since database and queries are given as separate ranges.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bevplace_ros.device import DEVICE_CHOICES

HELP = "for each query frame, write the database frame the place pipeline (retrieval + BEV re-ranking) picks, or -1 when it rejects all"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bevplace_ros.loop_detector import LoopDetectorConfig
    from bevplace_ros.models.checkpoint import MODEL_KINDS
    from bevplace_ros.place_recognizer import PlaceRecognizerConfig

    defaults = LoopDetectorConfig()
    parser.add_argument("dataset", type=Path, help="rosbag2, KITTI-style (velodyne/*.bin) or BEV image folder (imgs/ + pose.txt)")
    parser.add_argument("--db", required=True, metavar="START:END[:STEP]", help="database frames (data-set spec range notation)")
    parser.add_argument("--queries", required=True, metavar="START:END[:STEP]", help="query frames")
    parser.add_argument("--out", type=Path, required=True, help="output .npy: int64 per query, the data set's own frame index, -1 = rejected")
    parser.add_argument("--model", choices=MODEL_KINDS, default=PlaceRecognizerConfig.model, help="place network (default: the package default)")
    parser.add_argument("--weights", default="", help="checkpoint of --model; empty: its shipped weights")
    parser.add_argument("--rerank-k", type=int, default=defaults.rerank_k, help="places re-ranked by BEV inliers; 0: descriptor order")
    parser.add_argument("--min-inliers", type=int, default=defaults.min_inliers, help="re-ranking rejects places with fewer BEV inliers")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto")


def _describe(recognizer, spec, batch: int) -> tuple:
    """(descriptors (N, D), packed keypoints per frame) of the spec's frames: one network pass each."""
    from itertools import islice

    import numpy as np

    from bevplace_ros.training.place_dataset import iter_bev_images

    images, descriptors, keypoints = iter_bev_images(spec, recognizer.cfg.bev), [], []
    while chunk := list(islice(images, batch)):
        for features in recognizer.describe_images(np.stack(chunk)):
            descriptors.append(features.descriptor)
            keypoints.append(features.keypoints.packed())
    return np.array(descriptors, dtype=np.float32).reshape(len(descriptors), -1), keypoints


def pick(query, db_keypoints: list, rows, distances, cfg, pose_cfg) -> int:
    """Row of the database frame the pipeline picks for one query, or -1."""
    import numpy as np

    from bevplace_ros.bev_pose import BEVKeypoints
    from bevplace_ros.loop_detector import rerank

    ok = distances <= cfg.max_descriptor_distance
    rows, distances = rows[ok], distances[ok]
    if not cfg.rerank_k:
        rows, distances = rows[: cfg.top_k], distances[: cfg.top_k]
    order, _ = rerank(query, [BEVKeypoints.unpack(db_keypoints[r]) for r in rows], distances, cfg, pose_cfg)
    return int(rows[order[0]]) if len(order) else -1


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import numpy as np

    from bevplace_ros.atomic_io import atomic_write
    from bevplace_ros.bev_pose import BEVKeypoints
    from bevplace_ros.evaluation.place_metrics import descriptor_search
    from bevplace_ros.loop_detector import LoopDetectorConfig
    from bevplace_ros.models.checkpoint import CheckpointError
    from bevplace_ros.place_recognizer import PlaceRecognizer, PlaceRecognizerConfig
    from bevplace_ros.training.place_dataset import PlaceDataError, SequenceSpec, save_npy

    if args.batch < 1:
        raise SystemExit("retrieve: --batch must be >= 1")
    try:
        cfg = replace(LoopDetectorConfig(), rerank_k=args.rerank_k, min_inliers=args.min_inliers)
        db_spec, query_spec = (SequenceSpec.parse(f"{args.dataset}@{text}") for text in (args.db, args.queries))
        recognizer = PlaceRecognizer(PlaceRecognizerConfig(model=args.model, weights=args.weights, device=args.device))
        db_desc, db_keypoints = _describe(recognizer, db_spec, args.batch)
        query_desc, query_keypoints = _describe(recognizer, query_spec, args.batch)
    except (PlaceDataError, CheckpointError, ValueError) as err:
        raise SystemExit(f"retrieve: {err}") from None
    if not len(db_desc) or not len(query_desc):
        raise SystemExit(f"retrieve: {args.dataset} has no frames in --db {args.db} or --queries {args.queries}")
    rows, distances = descriptor_search(db_desc, query_desc, cfg.retrieved)
    pose_cfg = recognizer.cfg.pose
    picked = np.array([pick(BEVKeypoints.unpack(q), db_keypoints, r, d, cfg, pose_cfg) for q, r, d in zip(query_keypoints, rows, distances)])
    frames = np.where(picked >= 0, db_spec.start + db_spec.step * picked, -1).astype(np.int64)
    atomic_write(args.out, lambda tmp: save_npy(tmp, frames))
    print(f"wrote {len(frames)} matches to {args.out}: {int((frames < 0).sum())} queries rejected "
          f"(database {len(db_desc)} frames, re-ranking top {cfg.rerank_k}, min inliers {cfg.min_inliers})")
    return 0
