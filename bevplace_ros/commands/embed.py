"""`bevplace-ros embed`: one global descriptor per frame of a data set, for offline use."""

from __future__ import annotations

import argparse
from pathlib import Path

from bevplace_ros.device import DEVICE_CHOICES

HELP = "write one float32 BEVPlace descriptor per frame (frame order) to a .npy file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bevplace_ros.models.checkpoint import DEFAULT_MODEL, MODEL_KINDS

    parser.add_argument("dataset", metavar="DATASET[@START:END[:STEP]]", help="rosbag2, KITTI-style (velodyne/*.bin) or BEV image folder (imgs/ + pose.txt)")
    parser.add_argument("--out", type=Path, required=True, help="output .npy, shape (frames, descriptor dim)")
    parser.add_argument("--model", choices=MODEL_KINDS, default=DEFAULT_MODEL, help="network: the BEVPlace authors' v1 (default) or the package's equivariant one")
    parser.add_argument("--weights", default="", help="checkpoint of --model (bevplace_v1: the authors' .pth.tar too); empty: the shipped weights; "
                                                      "'random': untrained seeded network")
    parser.add_argument("--rotations", type=int, default=8, help="rotations of the equivariant network (bevplace_v1: fixed 5 x 5 group)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto")


def run(args: argparse.Namespace) -> int:
    from itertools import islice

    import numpy as np
    import torch

    from bevplace_ros.atomic_io import atomic_write
    from bevplace_ros.device import resolve_device
    from bevplace_ros.bev import BEVConfig
    from bevplace_ros.models.checkpoint import BEV_PRESET_OF_MODEL, RANDOM_WEIGHTS, CheckpointError, load_place_model, shipped_weights
    from bevplace_ros.training.place_dataset import (
        PlaceDataError,
        SequenceSpec,
        iter_bev_images,
        save_npy,
    )

    if not 1 <= args.rotations <= 64 or args.batch < 1:
        raise SystemExit("embed: need --rotations in [1, 64] and --batch >= 1")
    device = resolve_device(args.device)
    try:
        weights = args.weights if args.weights == RANDOM_WEIGHTS else shipped_weights(args.weights, args.model)
        model = load_place_model(weights, rotations=args.rotations, kind=args.model).for_inference().to(device)
        spec = SequenceSpec.parse(args.dataset)
        images, out = iter_bev_images(spec, BEVConfig.preset(BEV_PRESET_OF_MODEL[args.model])), []
        with torch.inference_mode():
            while chunk := list(islice(images, args.batch)):
                out.append(model(torch.from_numpy(np.stack(chunk))[:, None].to(device))[1].cpu().numpy())
    except (CheckpointError, PlaceDataError, ValueError) as err:
        raise SystemExit(f"embed: {err}") from None
    if not out:
        raise SystemExit(f"embed: {args.dataset} has no frames in range")
    descriptors = np.concatenate(out).astype(np.float32)
    atomic_write(args.out, lambda tmp: save_npy(tmp, descriptors))
    print(f"wrote {descriptors.shape[0]} x {descriptors.shape[1]} float32 descriptors to {args.out}")
    return 0
