"""`bevplace-ros evaluate bev`: how close BEV images made from raw scans come to the published
BEVPlace images of the same frames, per BEV preset, and whether a place model retrieves each raw
scan's own frame among all published frames (the network was trained on the published images; the
nodes feed it images made from raw scans)."""

from __future__ import annotations

import argparse
from pathlib import Path

from bevplace_ros.device import DEVICE_CHOICES

HELP = "compare BEV images made from raw scans with the published BEVPlace images of the same frames (NCC, occupied, saturated, retrieval)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bevplace_ros.bev import BEV_PRESETS
    from bevplace_ros.models.checkpoint import MODEL_KINDS, V1
    from bevplace_ros.training.place_dataset import DEFAULT_CACHE_DIR

    parser.add_argument("published", metavar="PUBLISHED[@START:END[:STEP]]",
                        help="BEVPlace image folder of the sequence (imgs/NNNNNN.png + pose.txt), e.g. kitti_bev/00; a range limits the "
                             "frames searched (it must hold the scans' frames)")
    parser.add_argument("scans", nargs="+", type=Path, help="KITTI-style folders of raw scans of that sequence (NNNNNN.bin: the frame number)")
    parser.add_argument("--presets", nargs="+", choices=sorted(BEV_PRESETS), default=["bevplace_kitti", "default"],
                        help="BEV recipes to compare; the first one also makes the retrieval queries")
    parser.add_argument("--retrieval", action="store_true",
                        help="also rank every published frame by descriptor distance to each raw scan's image (the published frames' "
                             "descriptors are cached as `evaluate place` caches them; the first run costs minutes)")
    parser.add_argument("--model", choices=MODEL_KINDS, default=V1, help="network of --retrieval")
    parser.add_argument("--weights", default="", help="checkpoint of --model (empty: its shipped weights)")
    parser.add_argument("--radius", type=float, default=5.0, help="metres: a retrieved frame this close to the scan's own frame counts as the place")
    parser.add_argument("--out", type=Path, default=Path("out/eval_bev"), help="folder for results.json")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto")


def ncc(image, stack):
    """Normalised cross-correlation of one image with each image of a stack (N, H, W)."""
    import numpy as np

    a = image.astype(np.float64).ravel()
    a = (a - a.mean()) / (np.linalg.norm(a - a.mean()) or 1.0)
    flat = stack.reshape(len(stack), -1).astype(np.float64)
    flat -= flat.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(flat, axis=1)
    return flat @ a / np.where(norms > 0, norms, 1.0)


def _ncc_ranks(image, published, own: int, chunk: int = 512):
    """(NCC with the own frame, rank of the own frame among all frames by NCC; 1 = best)."""
    import numpy as np

    scores = np.concatenate([ncc(image, published[s : s + chunk]) for s in range(0, len(published), chunk)])
    return float(scores[own]), int((scores > scores[own]).sum()) + 1


def _compare(scans, seq, presets: list[str]) -> dict:
    """Per preset and scan: NCC, occupied and saturated pixels against the published image of the same frame."""
    from dataclasses import asdict

    import numpy as np

    from bevplace_ros.bev import BEVConfig, make_bev
    from bevplace_ros.commands.benchmark_place import _median_ms

    published = seq.images.astype(np.float32) / 255.0
    out = {}
    for name in presets:
        cfg = BEVConfig.preset(name)
        rows = []
        for frame in scans:
            image = np.round(make_bev(frame.points, cfg) * 255.0) / 255.0  # on the scale of the PNGs, as sequences store images
            own = int(np.flatnonzero(seq.frame_ids == frame.index)[0])
            value, rank = _ncc_ranks(image, published, own)
            rows.append({"frame": frame.index, "ncc": round(value, 4), "ncc_rank": rank,
                         "occupied": int(np.count_nonzero(image)), "saturated": int(np.count_nonzero(image == 1.0)),
                         "published_occupied": int(np.count_nonzero(published[own])),
                         "published_saturated": int(np.count_nonzero(published[own] == 1.0))})
        biggest = max(scans, key=lambda f: len(f.points))
        out[name] = {"config": asdict(cfg), "scans": rows, "mean_ncc": round(float(np.mean([r["ncc"] for r in rows])), 4),
                     "make_bev_ms": _median_ms(lambda: make_bev(biggest.points, cfg), 20), "timed_points": len(biggest.points)}
    return out


def _retrieval(scans, seq, spec, preset: str, args) -> list[dict]:
    """Rank of each raw scan's own frame among all published frames by descriptor distance."""
    import numpy as np
    import torch

    from bevplace_ros.bev import BEVConfig, make_bev
    from bevplace_ros.device import resolve_device
    from bevplace_ros.models.checkpoint import load_place_model, shipped_weights
    from bevplace_ros.training.feature_bank import FeatureBank, sequence_local_features

    device = resolve_device(args.device)
    model = load_place_model(str(shipped_weights(args.weights, args.model)), kind=args.model).to(device).eval()
    local = sequence_local_features(model, seq, spec, args.cache_dir, args.batch, device)
    database = FeatureBank(torch.from_numpy(local)[:, None]).descriptors(model, device)
    cfg = BEVConfig.preset(preset)
    queries = np.stack([np.round(make_bev(f.points, cfg) * 255.0).astype(np.uint8) for f in scans])
    described = FeatureBank.build(model, queries, 1, lambda x: x, args.batch, device).descriptors(model, device)
    rows = []
    for frame, query in zip(scans, described):
        dist = np.linalg.norm(database - query[None], axis=1)
        own = int(np.flatnonzero(seq.frame_ids == frame.index)[0])
        top = int(np.argmin(dist))
        metres = float(np.linalg.norm(seq.positions[top] - seq.positions[own]))
        rows.append({"frame": frame.index, "top1_frame": int(seq.frame_ids[top]), "own_rank": int((dist < dist[own]).sum()) + 1,
                     "own_distance": round(float(dist[own]), 4), "top1_metres_from_own": round(metres, 2), "top1_within_radius": metres <= args.radius})
    return rows


def _print_table(compare: dict, retrieval: list[dict] | None, frames: int) -> None:
    names = list(compare)
    print(f"{'frame':>6} | " + " | ".join(f"{n[:16]:>16} NCC rank  occ  sat" for n in names) + " | published occ  sat"
          + (" | retrieval top-1 (own rank)" if retrieval else ""))
    for i, row in enumerate(compare[names[0]]["scans"]):
        cells = [compare[n]["scans"][i] for n in names]
        text = f"{row['frame']:>6} | " + " | ".join(f"{'':>16} {c['ncc']:.3f} {c['ncc_rank']:>4} {c['occupied']:>4} {c['saturated']:>4}" for c in cells)
        text += f" | {'':>9} {row['published_occupied']:>4} {row['published_saturated']:>4}"
        if retrieval:
            r = retrieval[i]
            text += f" | {r['top1_frame']:>6} ({r['own_rank']})"
        print(text)
    for n in names:
        print(f"{n}: mean NCC {compare[n]['mean_ncc']:.3f}, make_bev {compare[n]['make_bev_ms']['median_ms']:.1f} ms per "
              f"{compare[n]['timed_points']}-point scan (median of 20); NCC rank among {frames} published frames")


def run(args: argparse.Namespace) -> int:
    import json

    from bevplace_ros.atomic_io import atomic_write_bytes
    from bevplace_ros.datasets.frames import DatasetError
    from bevplace_ros.datasets.kitti import read_kitti
    from bevplace_ros.models.checkpoint import CheckpointError
    from bevplace_ros.training.place_dataset import PlaceDataError, SequenceSpec, load_sequence

    if args.batch < 1 or not args.radius > 0:
        raise SystemExit("evaluate bev: need --batch >= 1 and --radius > 0")
    try:
        spec = SequenceSpec.parse(args.published)
        seq = load_sequence(spec, cache_dir=args.cache_dir)
        scans = [frame for folder in args.scans for frame in read_kitti(folder)]
    except (PlaceDataError, DatasetError) as err:
        raise SystemExit(f"evaluate bev: {err}") from None
    unknown = [f.index for f in scans if f.index not in set(seq.frame_ids.tolist())]
    if unknown:
        raise SystemExit(f"evaluate bev: scans {unknown} have no published image in {args.published} ({len(seq)} frames searched)")
    compare = _compare(scans, seq, args.presets)
    report = {"published": args.published, "frames": len(seq), "presets": compare}
    if args.retrieval:
        try:
            report["retrieval"] = {"model": args.model, "weights": args.weights, "preset": args.presets[0],
                                   "scans": _retrieval(scans, seq, spec, args.presets[0], args)}
        except CheckpointError as err:
            raise SystemExit(f"evaluate bev: {err}") from None
    _print_table(compare, report.get("retrieval", {}).get("scans"), len(seq))
    path = atomic_write_bytes(args.out / "results.json", json.dumps(report, indent=2).encode())
    print(f"wrote {path}")
    return 0
