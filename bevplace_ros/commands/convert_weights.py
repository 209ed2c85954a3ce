"""`bevplace-ros convert-weights`: the BEVPlace authors' checkpoint -> the package's weight file."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "convert a BEVPlace (v1) checkpoint of the authors' code (.pth.tar) into the package's versioned weight file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, help="checkpoint written by the authors' code, e.g. checkpoint_paper_kitti.pth.tar")
    parser.add_argument("--out", type=Path, required=True, help="package weight file to write (.pt), usable as --weights / place.weights")


def run(args: argparse.Namespace) -> int:
    import hashlib

    import torch

    from bevplace_ros.models.checkpoint import CheckpointError, load_authors_checkpoint, load_checkpoint, save_checkpoint

    try:
        model = load_authors_checkpoint(args.source)
        digest = hashlib.sha256(args.source.read_bytes()).hexdigest()[:16]
        save_checkpoint(args.out, model, source=f"{args.source.name} sha256:{digest}")
        written = load_checkpoint(args.out)
    except CheckpointError as err:
        raise SystemExit(f"convert-weights: {err}") from None
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), written.state_dict().values()))
    if not same:
        raise SystemExit(f"convert-weights: {args.out} reads back different tensors")
    print(f"wrote {args.out}: {written.kind}, {len(written.state_dict())} tensors, descriptor {written.descriptor_dim}-d (from {args.source.name})")
    return 0
