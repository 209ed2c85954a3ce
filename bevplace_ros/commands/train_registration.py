"""`bevplace-ros train registration`: train RoITr-lite on simulator pairs and write shipped-format weights."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "train the rotation-invariant registration network (RoITr-lite) on simulator pairs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("out/registration/roitr_lite.pt"),
                        help="weights file to write (a .state.pt beside it holds the resume state)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--pairs-per-world", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, default=24.0, help="wall-time budget for the whole run")
    parser.add_argument("--cache-dir", default="out/registration_cache")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--resume", action="store_true", help="continue from the .state.pt beside --out")


def run(args: argparse.Namespace) -> int:
    import json
    import time
    import warnings

    import torch

    from bevplace_ros.registration.training import TrainConfig, train

    warnings.filterwarnings("ignore", category=RuntimeWarning, module="bevplace_ros.sim")
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(epochs=args.epochs, pairs_per_world=args.pairs_per_world, seed=args.seed,
                      max_minutes=args.max_minutes, cache_dir=args.cache_dir)
    start = time.perf_counter()
    summary = train(cfg, args.out, args.resume, log=lambda msg: print(msg, flush=True))
    print(json.dumps({"weights": str(args.out), "parameters": summary["parameters"],
                      "epochs_done": len(summary["history"]), "wall_minutes": (time.perf_counter() - start) / 60}))
    return 0
