"""`bevplace-ros train place`: metric-learn the BEVPlace network on sequences with ground-truth poses,
from scratch or by fine-tuning a trained model (`--init authors`: the BEVPlace authors' v1 network)."""

from __future__ import annotations

import argparse
from pathlib import Path

from bevplace_ros.device import DEVICE_CHOICES

HELP = "train the BEVPlace place-recognition network (triplet/quadruplet loss, hard-negative mining)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bevplace_ros.bev import BEV_PRESETS
    from bevplace_ros.models.checkpoint import DEFAULT_PLACE_WEIGHTS
    from bevplace_ros.training.place_dataset import DEFAULT_CACHE_DIR

    parser.add_argument("datasets", nargs="+", metavar="DATASET[@START:END[:STEP]]",
                        help="rosbag2 folder, KITTI-style folder (velodyne/*.bin + poses.txt) or BEV image folder (imgs/ + pose.txt); "
                             "@START:END[:STEP] keeps frames [START, END), every STEP-th, e.g. kitti_bev/00@0:3000:3")
    parser.add_argument("--val", nargs="*", default=[], metavar="DATASET[@START:END[:STEP]]", help="validation sequences (loop Recall@1 each epoch)")
    parser.add_argument("--out", type=Path, help=f"weights to write (best validation epoch); default {DEFAULT_PLACE_WEIGHTS} from scratch, "
                                                 "WORK_DIR/finetuned.pt with --init")
    parser.add_argument("--init", default="seeded", metavar="seeded|authors|WEIGHTS",
                        help="'seeded': a new network (seeded backbone, k-means NetVLAD); 'authors': fine-tune the BEVPlace authors' v1 "
                             "model (the shipped converted weights); a file: fine-tune that checkpoint. Fine-tuning starts from the "
                             "checkpoint's own NetVLAD; with --freeze-backbone only NetVLAD learns (minutes on a CPU)")
    parser.add_argument("--bev", choices=sorted(BEV_PRESETS),
                        help="BEV recipe for raw-scan data sets (BEV image folders are used as they are); default: bevplace_kitti for "
                             "the authors' v1 model, which was trained on images made that way, else default")
    parser.add_argument("--work-dir", type=Path, default=Path("out/train_place"), help="per-epoch checkpoints and resume state")
    parser.add_argument("--resume", action="store_true", help="continue from the last epoch in --work-dir")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="uint8 BEV image cache, and feature banks of --freeze-backbone")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--loss", choices=("triplet", "quadruplet"), default="triplet")
    parser.add_argument("--margin", type=float, default=0.3)
    parser.add_argument("--pos-radius", type=float, default=5.0, help="metres: positives within")
    parser.add_argument("--neg-radius", type=float, default=25.0, help="metres: negatives beyond")
    parser.add_argument("--negatives", type=int, default=4, help="hard negatives per tuple")
    parser.add_argument("--queries", type=int, default=256, help="training tuples per epoch")
    parser.add_argument("--pool", type=int, default=600, help="negative candidates in the per-epoch descriptor cache")
    parser.add_argument("--batch", type=int, default=4, help="tuples per optimiser step")
    parser.add_argument("--train-rotations", type=int, default=1)
    parser.add_argument("--val-rotations", type=int, default=2)
    parser.add_argument("--freeze-backbone", action="store_true",
                        help="keep the seeded CNN fixed and train NetVLAD only, on local features computed once per view (fast on a CPU); "
                             "validation then runs at --train-rotations")
    parser.add_argument("--bank-views", type=int, default=2, help="with --freeze-backbone: views per frame, the first unaltered, the others augmented")
    parser.add_argument("--max-shift", type=float, default=1.5, help="metres of random translation augmentation")
    parser.add_argument("--time-limit-min", type=float, default=0.0, help="stop after the epoch that crosses this wall time (0: none)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto")


def run(args: argparse.Namespace) -> int:
    import json
    import time

    import torch

    from bevplace_ros.bev import BEVConfig
    from bevplace_ros.models.checkpoint import DEFAULT_PLACE_WEIGHTS, CheckpointError, save_checkpoint
    from bevplace_ros.training.mining import MiningConfig
    from bevplace_ros.training.place_dataset import PlaceDataError, load_sequence
    from bevplace_ros.training.place_trainer import (
        AugmentConfig,
        PlaceTrainConfig,
        train_place,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        init, bev_preset = _init(args.init)
        bev = BEVConfig.preset(args.bev or bev_preset)
        cfg = PlaceTrainConfig(
            epochs=args.epochs, lr=args.lr, loss=args.loss, margin=args.margin, margin2=args.margin / 2, batch_tuples=args.batch,
            train_rotations=args.train_rotations, val_rotations=args.val_rotations, seed=args.seed, device=args.device,
            time_limit_min=args.time_limit_min, train_backbone=not args.freeze_backbone, bank_views=args.bank_views, augment=AugmentConfig(max_shift_m=args.max_shift),
            init=init,
            mining=MiningConfig(pos_radius_m=args.pos_radius, neg_radius_m=args.neg_radius, negatives=args.negatives,
                                queries_per_epoch=args.queries, pool_size=args.pool),
        )
        train = [load_sequence(spec, bev, cache_dir=args.cache_dir) for spec in args.datasets]
        val = [load_sequence(spec, bev, cache_dir=args.cache_dir) for spec in args.val]
    except (ValueError, PlaceDataError, CheckpointError) as err:
        raise SystemExit(f"train place: {err}") from None
    print(f"data: {sum(len(s) for s in train)} training frames in {len(train)} sequences, {sum(len(s) for s in val)} validation frames, "
          f"BEV {args.bev or bev_preset} ({time.perf_counter() - start:.0f} s); init: {init or 'seeded'}", flush=True)
    model, history = train_place(train, val, cfg, args.work_dir, resume=args.resume, progress=lambda m: print(m, flush=True),
                                 bank_dir=args.cache_dir)
    out = args.out or (args.work_dir / "finetuned.pt" if init else DEFAULT_PLACE_WEIGHTS)
    save_checkpoint(out, model)
    last = history[-1] if history else None
    print(json.dumps({"weights": str(out), "epochs_done": len(history), "final_loss": last and last.loss,
                      "val_recall_at_1": [h.val_recall_at_1 for h in history], "wall_minutes": round((time.perf_counter() - start) / 60, 1)}))
    return 0


def _init(choice: str) -> tuple[str, str]:
    """(checkpoint to start from, "" for a seeded network; the BEV preset its images need)."""
    from bevplace_ros.models.checkpoint import BEV_PRESET_OF_MODEL, DEFAULT_V1_WEIGHTS, load_checkpoint

    if choice == "seeded":
        return "", "default"
    path = str(DEFAULT_V1_WEIGHTS) if choice == "authors" else choice
    return path, BEV_PRESET_OF_MODEL[load_checkpoint(path).kind]
