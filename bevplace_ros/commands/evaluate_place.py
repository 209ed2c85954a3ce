"""`bevplace-ros evaluate place`: Recall@1 / Recall@1% (BEVPlace split protocol) and loop-detection
PR curves / F1max (same vs reverse direction) for the trained network and its baselines."""

from __future__ import annotations

import argparse
from pathlib import Path

from bevplace_ros.device import DEVICE_CHOICES

HELP = "evaluate place recognition (Recall@1, Recall@1%, PR/F1max) against Scan Context and untrained weights"

METHODS = ("bevplace", "random", "scan_context")
# BEVPlace's published database / query split of the KITTI sequences: name -> (frames, db_end, query_start)
KITTI_SPLITS = {"00": (4541, 3000, 3200), "02": (4661, 3400, 3600), "05": (2761, 1000, 1200), "06": (1101, 600, 800)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bevplace_ros.models.checkpoint import DEFAULT_MODEL, MODEL_KINDS
    from bevplace_ros.training.place_dataset import DEFAULT_CACHE_DIR

    parser.add_argument("datasets", nargs="+", metavar="DATASET[@START:END[:STEP]]", help="sequences with ground truth (rosbag2, KITTI-style or BEV image folder)")
    parser.add_argument("--model", choices=MODEL_KINDS, default=DEFAULT_MODEL, help="network of the 'bevplace' and 'random' methods")
    parser.add_argument("--weights", default="", help="checkpoint of the 'bevplace' method (package .pt, or the authors' .pth.tar for bevplace_v1); "
                                                      "empty: the shipped weights of --model")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="'random': same network, untrained seeded weights")
    parser.add_argument("--rotations", type=int, default=8, help="rotation group size at inference")
    parser.add_argument("--split", metavar="DB_END:QUERY_START",
                        help="database = frames [0, DB_END), queries = [QUERY_START, end); default: BEVPlace's split for KITTI 00/02/05/06 "
                             "(recognised by folder name and frame count), else the first / second half")
    parser.add_argument("--radius", type=float, default=5.0, help="metres: a match within this is correct")
    parser.add_argument("--exclude-recent", type=int, default=100, help="frames: loop matches must be older than this")
    parser.add_argument("--out", type=Path, default=Path("out/eval_place"), help="folder for results.json and PNG plots")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    parser.add_argument("--seed", type=int, default=0, help="seed of the untrained 'random' weights")
    parser.add_argument("--rerank", type=int, default=0, metavar="K",
                        help="also score each network method with the pipeline's re-ranking of its top K places by BEV geometric "
                             "agreement (reported as METHOD+rerank; Recall@1 without rejection, F1max sweeps the inlier threshold); 0: off")


def _split(seq_name: str, frames: int, override: str | None) -> tuple[int, int]:
    if override:
        db_end, _, query_start = override.partition(":")
        try:
            split = int(db_end), int(query_start)
        except ValueError:
            raise SystemExit(f"evaluate place: --split must be DB_END:QUERY_START integers, got {override!r}") from None
    else:
        known = KITTI_SPLITS.get(Path(seq_name.split("@")[0]).name)
        split = known[1:] if known and known[0] == frames else (frames // 2, frames // 2)
    if not 0 < split[0] <= split[1] < frames:
        raise SystemExit(f"evaluate place: split {split} does not fit {seq_name} ({frames} frames)")
    return split


def _network_descriptors(seq, spec, args, weights: str):
    """Descriptors of one sequence. The backbone's local features (float16) are cached per (sequence,
    network code, backbone weights, input blur, rotations): weights that share a backbone, such as NetVLAD-only
    training and the untrained baseline, pay for the CNN once, and re-plotting pays for nothing."""

    import numpy as np
    import torch

    from bevplace_ros.device import resolve_device
    from bevplace_ros.models.checkpoint import RANDOM_WEIGHTS, load_place_model, shipped_weights
    from bevplace_ros.training.feature_bank import FeatureBank, local_feature_key
    from bevplace_ros.training.place_dataset import cached_arrays, sequence_cache_key

    device = resolve_device(args.device)
    weights = weights if weights == RANDOM_WEIGHTS else shipped_weights(weights, args.model)
    model = load_place_model(weights, rotations=args.rotations, seed=args.seed, kind=args.model).to(device).eval()
    key = f"{sequence_cache_key(spec)}-local-{local_feature_key(model)}"

    def compute():
        bank = FeatureBank.build(model, seq.images, 1, lambda x: x, args.batch, device)
        return (bank.features[:, 0].numpy(),)

    local = cached_arrays(args.cache_dir, key, ("local_float16",), compute)[0]
    return FeatureBank(torch.from_numpy(local)[:, None]).descriptors(model, device).astype(np.float32), local, model


def _keypoints(seq, local, model) -> list:
    """Each frame's BEV keypoints as the place node makes them (default BEV and pose settings)."""
    from bevplace_ros.bev import BEVConfig
    from bevplace_ros.bev_pose import BEVPoseConfig, extract_keypoints

    bev_cfg, pose_cfg = BEVConfig(), BEVPoseConfig()
    return [extract_keypoints(image / 255.0, feats.astype("float32"), bev_cfg, pose_cfg, model.feature_coords) for image, feats in zip(seq.images, local)]


def _scan_contexts(seq, spec, args):
    """Raw scans where the data set has them; BEV images (occupied cells) otherwise."""
    import numpy as np

    from bevplace_ros.baselines.scan_context import (
        ScanContextConfig,
        scan_context,
        scan_context_from_bev,
    )
    from bevplace_ros.datasets.frames import dataset_kind
    from bevplace_ros.training.place_dataset import (
        cached_arrays,
        frames_in_range,
        sequence_cache_key,
    )

    from_bev = dataset_kind(spec.path) == "bev_images"
    cfg = ScanContextConfig(max_range_m=30.0) if from_bev else ScanContextConfig()

    def compute():
        if from_bev:
            return (np.stack([scan_context_from_bev(img / 255.0, cfg=cfg) for img in seq.images]),)
        return (np.stack([scan_context(f.points, cfg) for f in frames_in_range(spec)]),)

    return cached_arrays(args.cache_dir, f"{sequence_cache_key(spec)}-sc", ("scan_context",), compute)[0], cfg, from_bev


def _evaluate_method(name, seq, split, args, out_dir, descriptors=None, scan_contexts=None, sc_cfg=None, keypoints=None):
    from dataclasses import replace

    from bevplace_ros.baselines.scan_context import sc_loop_matches, sc_top_k
    from bevplace_ros.bev_pose import BEVPoseConfig
    from bevplace_ros.evaluation.place_metrics import (
        DIRECTIONS,
        descriptor_loop_matches,
        descriptor_loop_top_k,
        descriptor_search,
        descriptor_top_k,
        loop_correct,
        loop_recall_at_1,
        pr_curve,
        reranked_loop_matches,
        rerank_rows,
        revisit_directions,
        split_recall,
        top_percent_k,
    )
    from bevplace_ros.loop_detector import LoopDetectorConfig
    from bevplace_ros.evaluation.place_plots import plot_detections

    db_end, q_start = split
    k = top_percent_k(db_end)
    if keypoints is not None:
        cfg, pose_cfg = replace(LoopDetectorConfig(), rerank_k=args.rerank), BEVPoseConfig()
        rows, dist = descriptor_search(descriptors[:db_end], descriptors[q_start:], max(k, args.rerank))
        top = rerank_rows(rows, dist, keypoints[q_start:], keypoints[:db_end], cfg, pose_cfg)[0]
        matches = reranked_loop_matches(*descriptor_loop_top_k(descriptors, args.exclude_recent, args.rerank), keypoints, cfg, pose_cfg)
    elif descriptors is not None:
        top = descriptor_top_k(descriptors[:db_end], descriptors[q_start:], k)
        matches = descriptor_loop_matches(descriptors, args.exclude_recent)
    else:
        top = sc_top_k(scan_contexts[:db_end], scan_contexts[q_start:], k, sc_cfg)
        matches = sc_loop_matches(scan_contexts, args.exclude_recent, sc_cfg)
    recall = split_recall(top, seq.positions[:db_end], seq.positions[q_start:], args.radius)
    directions = revisit_directions(seq.positions, seq.headings, args.exclude_recent, args.radius)
    correct = loop_correct(matches, seq.positions, args.radius)
    curves = {d: pr_curve(matches, correct, directions, d) for d in DIRECTIONS}
    overall = pr_curve(matches, correct, directions)
    plot = plot_detections(seq.positions, matches, correct, directions != "", overall.threshold_at_f1_max,
                           f"{seq.name}: {name}", out_dir / f"trajectory_{_slug(seq.name)}_{name}.png")
    result = {
        "recall_at_1": recall.recall_at_1, "recall_at_1pct": recall.recall_at_1pct, "split_queries": recall.queries,
        "loop_recall_at_1": loop_recall_at_1(matches, seq.positions, directions, args.radius),
        "f1max": overall.f1_max, "threshold": overall.threshold_at_f1_max,
        **{f"f1max_{d}": curves[d].f1_max for d in DIRECTIONS}, **{f"revisits_{d}": curves[d].revisits for d in DIRECTIONS},
        "trajectory_png": str(plot),
    }
    return result, curves


def _report(seq_name: str, method: str, r: dict, t0: float) -> None:
    import time

    r["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{seq_name} {method:16s} R@1 {r['recall_at_1']:6.2f}  R@1% {r['recall_at_1pct']:6.2f}  (n={r['split_queries']})  "
          f"F1max same {_fmt(r['f1max_same'])} (n={r['revisits_same']})  reverse {_fmt(r['f1max_reverse'])} (n={r['revisits_reverse']})  "
          f"[{r['seconds']} s]", flush=True)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _slug(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")[-60:]


def run(args: argparse.Namespace) -> int:
    import json
    import time

    from bevplace_ros.atomic_io import atomic_write_bytes
    from bevplace_ros.evaluation.place_plots import plot_pr_curves
    from bevplace_ros.models.checkpoint import CheckpointError
    from bevplace_ros.training.place_dataset import (
        PlaceDataError,
        SequenceSpec,
        load_sequence,
    )

    if not 1 <= args.rotations <= 64 or args.batch < 1 or args.exclude_recent < 0 or not args.radius > 0 or args.rerank < 0:
        raise SystemExit("evaluate place: need --rotations in [1, 64], --batch >= 1, --exclude-recent >= 0, --radius > 0, --rerank >= 0")
    report = {"model": args.model, "weights": args.weights, "rotations": args.rotations, "radius_m": args.radius, "exclude_recent": args.exclude_recent, "sequences": {}}
    for text in args.datasets:
        try:
            spec = SequenceSpec.parse(text)
            seq = load_sequence(spec, cache_dir=args.cache_dir)
        except PlaceDataError as err:
            raise SystemExit(f"evaluate place: {err}") from None
        split = _split(seq.name, len(seq), args.split)
        results, curves = {}, {}
        for method in args.methods:
            t0 = time.perf_counter()
            if method == "scan_context":
                sc, sc_cfg, from_bev = _scan_contexts(seq, spec, args)
                results[method], curves[method] = _evaluate_method(method, seq, split, args, args.out, scan_contexts=sc, sc_cfg=sc_cfg)
                results[method]["built_from"] = "BEV image" if from_bev else "raw scan"
            else:
                try:
                    desc, local, model = _network_descriptors(seq, spec, args, "random" if method == "random" else args.weights)
                except CheckpointError as err:
                    raise SystemExit(f"evaluate place: {err}") from None
                results[method], curves[method] = _evaluate_method(method, seq, split, args, args.out, descriptors=desc)
                if args.rerank:
                    _report(seq.name, method, results[method], t0)
                    t0, method = time.perf_counter(), f"{method}+rerank"
                    results[method], curves[method] = _evaluate_method(method, seq, split, args, args.out, descriptors=desc,
                                                                       keypoints=_keypoints(seq, local, model))
                    results[method]["rerank_k"] = args.rerank
            _report(seq.name, method, results[method], t0)
        pr_png = plot_pr_curves(curves, seq.name, args.out / f"pr_{_slug(seq.name)}.png")
        report["sequences"][seq.name] = {"frames": len(seq), "split": {"db_end": split[0], "query_start": split[1]}, "methods": results, "pr_png": str(pr_png)}
    path = atomic_write_bytes(args.out / "results.json", json.dumps(report, indent=2).encode())
    print(f"wrote {path}")
    return 0
