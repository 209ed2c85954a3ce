"""Training RoITr-lite on simulator pairs: a cached pair pool, overlap-aware circle losses, resumable loop.

Preparing a pair (ray casting + voxelising + patches + labels) costs more than a training step on
this CPU, so pairs are prepared once into `cache_dir` and epochs reuse them. The network is exactly
rotation-invariant, so rotation augmentation acts through what it changes: voxel grids, superpoint
choice and the tilt of the ground (roll/pitch drawn per scan in the simulator).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch.nn import functional as F

from bevplace_ros.registration.checkpoint import read_checkpoint, save_checkpoint
from bevplace_ros.registration.model import (
    ModelConfig,
    RoITrLite,
    count_parameters,
    encode_arrays,
)
from bevplace_ros.registration.preprocess import (
    CLOUD_KEYS,
    PreprocessConfig,
    prepare_cloud,
)
from bevplace_ros.se3 import transform_points


@dataclass(frozen=True)
class TrainConfig:
    """Data, schedule and loss settings; defaults fit ~25 min on one CPU thread."""

    train_worlds: tuple[tuple[str, int], ...] = tuple((s, i) for s in ("urban", "suburban") for i in (1, 2, 3))
    pairs_per_world: int = 50
    epochs: int = 6
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    cache_dir: str = "out/registration_cache"
    coarse_positive_overlap: float = 0.1  # patch pairs sharing >= 10 % of points are positives
    fine_positive_radius: float = 0.6  # metres; fine points this close after GT alignment match
    fine_negative_radius: float = 1.5
    fine_samples: int = 256  # source fine points per pair in the fine loss
    max_minutes: float = 24.0  # wall-time budget: no epoch is started that would end past it
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def __post_init__(self) -> None:
        for name in ("pairs_per_world", "epochs", "fine_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 < self.fine_positive_radius < self.fine_negative_radius:
            raise ValueError("need 0 < fine_positive_radius < fine_negative_radius")
        if not self.train_worlds:
            raise ValueError("train_worlds must name at least one (style, seed)")


def patch_overlap(src: dict, tgt: dict, T_tgt_src: np.ndarray, radius: float) -> np.ndarray:
    """(S_src, S_tgt) share of a source patch's points whose GT partner lies in the target patch."""
    moved = transform_points(T_tgt_src, src["fine_points"])
    dist, nn = cKDTree(tgt["fine_points"]).query(moved)
    partner = np.where(dist < radius, nn, -1)
    member = np.zeros((len(tgt["fine_points"]) + 1, len(tgt["superpoints"])), dtype=np.float32)
    member[tgt["patches"].ravel(), np.repeat(np.arange(len(tgt["superpoints"])), tgt["patches"].shape[1])] = 1.0
    slots = partner[src["patches"]]  # (S, K), -1 -> the all-zero last row
    return member[slots].sum(axis=1) / src["patches"].shape[1]


def prepare_pair(pair, cfg: TrainConfig) -> dict[str, np.ndarray]:
    """Flatten a pair into arrays: both prepared clouds, the GT transform and the patch-overlap labels."""
    src = prepare_cloud(pair.source, cfg.preprocess).arrays()
    tgt = prepare_cloud(pair.target, cfg.preprocess).arrays()
    out = {f"{side}_{k}": v.astype(np.int32 if v.dtype.kind == "i" else np.float32)
           for side, arrays in (("src", src), ("tgt", tgt)) for k, v in arrays.items()}
    out["T"] = pair.T_target_source
    out["overlap"] = patch_overlap(src, tgt, pair.T_target_source, cfg.fine_positive_radius).astype(np.float16)
    return out


def build_cache(cfg: TrainConfig, log) -> list[Path]:
    """Cast and prepare the training pairs once; reruns and resumes reuse the files."""
    from bevplace_ros.atomic_io import atomic_write
    from bevplace_ros.registration.sim_pairs import sample_pairs

    root = Path(cfg.cache_dir)
    files = []
    for style, seed in cfg.train_worlds:
        path = root / f"{style}_{seed}_{cfg.pairs_per_world}.npz"
        if not path.exists():
            start = time.perf_counter()
            arrays = [prepare_pair(p, cfg) for p in sample_pairs(style, seed, {"train": cfg.pairs_per_world})]
            packed = {f"{i}/{k}": v for i, a in enumerate(arrays) for k, v in a.items()}
            atomic_write(path, lambda tmp, arrays=packed: _savez(tmp, arrays))
            log(f"cached {len(arrays)} pairs of {style}/{seed} in {time.perf_counter() - start:.0f} s -> {path}")
        files.append(path)
    return files


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as handle:  # a file object: np.savez would append ".npz" to a path
        np.savez(handle, **arrays)


def load_cache(files: list[Path]) -> list[dict[str, np.ndarray]]:
    pairs = []
    for path in files:
        with np.load(path) as data:
            grouped: dict[str, dict[str, np.ndarray]] = {}
            for key in data.files:
                index, name = key.split("/", 1)
                grouped.setdefault(index, {})[name] = data[key]
        pairs.extend(grouped[i] for i in sorted(grouped, key=int))
    return pairs


def circle_loss(dist: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, pos_scale: torch.Tensor,
                log_scale: float = 24.0, pos_margin: float = 0.1, neg_margin: float = 1.4) -> torch.Tensor:
    """GeoTransformer's overlap-aware circle loss on descriptor distances, both directions."""
    pos_w = torch.relu(dist - pos_margin).detach() * pos_scale * pos
    neg_w = torch.relu(neg_margin - dist).detach() * neg
    big = 1e5
    pos_logits = log_scale * (dist - pos_margin) * pos_w - big * (~pos)
    neg_logits = log_scale * (neg_margin - dist) * neg_w - big * (~neg)
    losses = []
    for dim in (1, 0):
        valid = pos.any(dim=dim) & neg.any(dim=dim)
        if valid.any():
            term = F.softplus(torch.logsumexp(pos_logits, dim=dim) + torch.logsumexp(neg_logits, dim=dim)) / log_scale
            losses.append(term[valid].mean())
    return torch.stack(losses).mean() if losses else dist.sum() * 0.0


def pair_loss(model: RoITrLite, pair: dict[str, np.ndarray], cfg: TrainConfig, rng: np.random.Generator
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """Coarse circle loss on superpoint descriptors + fine circle loss on point descriptors."""
    cpu = torch.device("cpu")
    src = encode_arrays(model, {k: pair[f"src_{k}"] for k in CLOUD_KEYS}, cpu)
    tgt = encode_arrays(model, {k: pair[f"tgt_{k}"] for k in CLOUD_KEYS}, cpu)
    fs, ft = model.match(src, tgt)
    overlap = torch.as_tensor(pair["overlap"].astype(np.float32))
    coarse = circle_loss(torch.cdist(fs, ft), overlap >= cfg.coarse_positive_overlap, overlap == 0,
                         overlap.sqrt())

    moved = transform_points(pair["T"], pair["src_fine_points"])
    tgt_pts = pair["tgt_fine_points"]
    nearest, _ = cKDTree(tgt_pts).query(moved)
    candidates = np.nonzero(nearest < cfg.fine_positive_radius)[0]
    if len(candidates) == 0:
        return coarse, {"coarse": coarse.item(), "fine": 0.0}
    rows = rng.choice(candidates, size=min(cfg.fine_samples, len(candidates)), replace=False)
    geo = torch.cdist(torch.as_tensor(moved[rows], dtype=torch.float32), torch.as_tensor(tgt_pts, dtype=torch.float32))
    fine = circle_loss(torch.cdist(src.point_desc[rows], tgt.point_desc), geo < cfg.fine_positive_radius,
                       geo > cfg.fine_negative_radius, torch.ones_like(geo))
    return coarse + fine, {"coarse": coarse.item(), "fine": fine.item()}


def train(cfg: TrainConfig, out_path: Path, resume: bool, log=print) -> dict:
    """Train with a checkpoint (model + optimiser + epoch) written atomically after every epoch."""
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    pairs = load_cache(build_cache(cfg, log))
    model = RoITrLite(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * len(pairs))
    state_path = out_path.with_suffix(".state.pt")
    first_epoch, history = 0, []
    if resume and state_path.exists():
        state = read_checkpoint(state_path)
        model.load_state_dict(state["state_dict"])
        opt.load_state_dict(state["extra"]["optimizer"])
        sched.load_state_dict(state["extra"]["scheduler"])
        first_epoch, history = state["extra"]["epoch"] + 1, state["extra"]["history"]
        log(f"resumed after epoch {first_epoch - 1}")
    log(f"{len(pairs)} training pairs, {count_parameters(model)} parameters")
    for epoch in range(first_epoch, cfg.epochs):
        rng = np.random.default_rng([cfg.seed, epoch])
        model.train()
        sums = {"coarse": 0.0, "fine": 0.0}
        for index in rng.permutation(len(pairs)):
            loss, parts = pair_loss(model, pairs[index], cfg, rng)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            for k in sums:
                sums[k] += parts[k] / len(pairs)
        minutes = (time.perf_counter() - start) / 60
        history.append({"epoch": epoch, **sums, "minutes": minutes})
        log(json.dumps(history[-1]))
        meta = {"train_config": json.loads(json.dumps(asdict(cfg))), "history": history,
                "parameters": count_parameters(model)}
        save_checkpoint(state_path, model, meta, {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                                  "epoch": epoch, "history": history})
        save_checkpoint(out_path, model, meta)
        epoch_minutes = minutes - (history[-2]["minutes"] if len(history) > 1 else 0.0)
        if epoch + 1 < cfg.epochs and minutes + epoch_minutes > cfg.max_minutes:
            log(f"stopping after epoch {epoch}: another epoch would pass max_minutes={cfg.max_minutes}")
            break
    return {"history": history, "parameters": count_parameters(model)}
