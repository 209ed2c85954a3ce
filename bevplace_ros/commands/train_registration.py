"""`bevplace-ros train registration`: train RoITr-lite's attention and heads on simulator pairs (frozen PPF
encoders, cached encodings, a distance curriculum), resumable across sessions, writing shipped-format weights."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "train the rotation-invariant registration network (RoITr-lite) on simulator pairs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bevplace_ros.registration.training import TrainConfig

    defaults = TrainConfig()
    parser.add_argument("--out", type=Path, default=Path("out/registration/roitr_lite.pt"),
                        help="weights file, written whenever the validation coarse inlier ratio improves")
    parser.add_argument("--state", type=Path, default=None,
                        help="resume state (model + optimiser + history), written every epoch; default: .state.pt "
                             "beside --out")
    parser.add_argument("--log", type=Path, default=None, help="JSON training log written every epoch (optional)")
    parser.add_argument("--init", default=defaults.init_weights,
                        help="weights a fresh run starts from; their PPF encoders stay frozen")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="length of the cosine schedule")
    parser.add_argument("--pairs-per-world", type=int, default=defaults.pairs_per_world)
    parser.add_argument("--max-superpoints", type=int, default=defaults.max_superpoints,
                        help="random superpoints per cloud and epoch in training")
    parser.add_argument("--start-distance", type=float, default=defaults.start_distance,
                        help="metres: the curriculum's first epoch uses pairs this close (14: no curriculum)")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--max-minutes", type=float, default=defaults.max_minutes,
                        help="wall-time budget for the whole run")
    parser.add_argument("--cache-dir", default=defaults.cache_dir)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--resume", action="store_true", help="continue from --state")


def run(args: argparse.Namespace) -> int:
    import json
    import time
    import warnings

    import torch

    from bevplace_ros.registration.training import TrainConfig, train

    warnings.filterwarnings("ignore", category=RuntimeWarning, module="bevplace_ros.sim")
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(epochs=args.epochs, pairs_per_world=args.pairs_per_world, seed=args.seed, lr=args.lr,
                      max_minutes=args.max_minutes, cache_dir=args.cache_dir, init_weights=args.init,
                      max_superpoints=args.max_superpoints, start_distance=args.start_distance)
    start = time.perf_counter()
    summary = train(cfg, args.out, args.resume, log=lambda msg: print(msg, flush=True), state_path=args.state,
                    log_path=args.log)
    print(json.dumps({"weights": str(args.out), "parameters": summary["parameters"], "best": summary["best"],
                      "epochs_done": sum("pairs" in h for h in summary["history"]),
                      "wall_minutes": (time.perf_counter() - start) / 60}))
    return 0
