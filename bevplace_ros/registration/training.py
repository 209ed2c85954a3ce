"""Training RoITr-lite on simulator pairs within a CPU budget: frozen PPF encoders, cached encodings, a curriculum.

Preparing a pair (ray casting + voxelising + patches + labels) is done once into `cache_dir`. The PPF point and
patch encoders and the superpoint-pair PPF embedding are frozen (taken from `init_weights`), so each cloud is
encoded once per run and an epoch trains only the attention layers and the two heads, on a random subset of at
most `max_superpoints` superpoints per cloud (attention's cost is quadratic in it; the subset also varies the
data). A curriculum widens the pair distance from `start_distance` to all training pairs. The network is exactly
rotation-invariant, so rotation augmentation acts only through what it changes (voxel grids, superpoint choice,
the ground's tilt), which the cached pairs already hold.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch.nn import functional as F

from bevplace_ros.registration.checkpoint import (
    DEFAULT_WEIGHTS,
    load_model,
    read_checkpoint,
    save_checkpoint,
)
from bevplace_ros.registration.matching import MatchingConfig, coarse_matches
from bevplace_ros.registration.model import (
    EncodedCloud,
    ModelConfig,
    RoITrLite,
    cloud_tensors,
    count_parameters,
)
from bevplace_ros.registration.preprocess import (
    CLOUD_KEYS,
    PreprocessConfig,
    prepare_cloud,
)
from bevplace_ros.se3 import transform_points

FROZEN_MODULES = ("point_encoder", "patch_encoder", "ppf_embed")  # the PPF encoders: their outputs are cached per cloud
MAX_PAIR_DISTANCE = 14.0  # metres: the widest training pairs (sim_pairs.DISTANCES["train"])


@dataclass(frozen=True)
class TrainConfig:
    """Data, schedule and loss settings; a fresh run starts from `init_weights`, whose encoders stay frozen."""

    train_worlds: tuple[tuple[str, int], ...] = tuple((s, i) for s in ("urban", "suburban") for i in (1, 2, 3))
    pairs_per_world: int = 150
    val_worlds: tuple[tuple[str, int], ...] = (("urban", 50), ("suburban", 50))  # evaluate registration's validation
    val_pairs: int = 10  # loop and 10-14 m pairs per validation world
    epochs: int = 40  # length of the cosine schedule; a later session may resume with more
    lr: float = 1e-4  # 1e-3 collapsed the coarse descriptors within an epoch of fine-tuning (frozen or not)
    weight_decay: float = 1e-4
    seed: int = 0
    cache_dir: str = "out/registration_cache"
    init_weights: str = str(DEFAULT_WEIGHTS)
    max_superpoints: int = 256  # random subset per cloud and epoch
    start_distance: float = 6.0  # metres: the curriculum's first epoch uses pairs this close (loop-like)
    curriculum_epochs: int = 4  # epochs until every training pair (up to 14 m) is used
    coarse_positive_overlap: float = 0.1  # patch pairs sharing >= 10 % of points are positives
    coarse_temperature: float = MatchingConfig().coarse_temperature  # the registrar's dual-softmax sharpness
    fine_positive_radius: float = 0.6  # metres; fine points this close after GT alignment match
    fine_negative_radius: float = 1.5
    fine_samples: int = 256  # source fine points per pair in the fine loss
    max_minutes: float = 110.0  # wall-time budget: no epoch is started that would end past it
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def __post_init__(self) -> None:
        for name in ("pairs_per_world", "val_pairs", "epochs", "fine_samples", "curriculum_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_superpoints < 8:
            raise ValueError(f"max_superpoints must be >= 8, got {self.max_superpoints}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 < self.start_distance <= MAX_PAIR_DISTANCE:
            raise ValueError(f"start_distance must be in (0, {MAX_PAIR_DISTANCE}] m, got {self.start_distance}")
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


def build_cache(cfg: TrainConfig, log, validation: bool = False) -> list[Path]:
    """Cast and prepare the training (or validation: loop + 10-14 m) pairs once; reruns and resumes reuse the files."""
    from bevplace_ros.atomic_io import atomic_write
    from bevplace_ros.registration.sim_pairs import sample_pairs

    root = Path(cfg.cache_dir)
    files = []
    for style, seed in cfg.val_worlds if validation else cfg.train_worlds:
        n = cfg.val_pairs if validation else cfg.pairs_per_world
        kinds = {"loop": n, "odometry": n} if validation else {"train": n}
        path = root / f"{'val_' if validation else ''}{style}_{seed}_{n}.npz"
        if not path.exists():
            start = time.perf_counter()
            arrays = [prepare_pair(p, cfg) for p in sample_pairs(style, seed, kinds)]
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


@dataclass
class FrozenCloud:
    """One cloud's outputs of the frozen encoders, computed once per run."""

    point_feat: torch.Tensor  # (F, point_dim) before the trainable fine head
    super_feat: torch.Tensor  # (S, super_dim)
    superpoints: torch.Tensor  # (S, 3)
    super_normals: torch.Tensor  # (S, 3)


def freeze_encoders(model: RoITrLite) -> list[torch.nn.Parameter]:
    """Stop gradients into FROZEN_MODULES; the parameters left to train."""
    for name in FROZEN_MODULES:
        getattr(model, name).requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def encode_frozen(model: RoITrLite, pair: dict[str, np.ndarray]) -> tuple[FrozenCloud, FrozenCloud]:
    clouds = []
    for side in ("src", "tgt"):
        tensors = cloud_tensors({k: pair[f"{side}_{k}"] for k in CLOUD_KEYS}, torch.device("cpu"))
        point_feat, super_feat = model.encode_patches(*tensors)
        clouds.append(FrozenCloud(point_feat, super_feat, tensors[3], tensors[4]))
    return clouds[0], clouds[1]


def superpoint_subset(count: int, limit: int, rng: np.random.Generator | None) -> np.ndarray:
    """All superpoints, or a random sorted subset of `limit` of them (None: the first `limit`, for validation)."""
    if count <= limit:
        return np.arange(count)
    return np.sort(rng.choice(count, limit, replace=False)) if rng is not None else np.arange(limit)


def complete(model: RoITrLite, cloud: FrozenCloud, keep: np.ndarray) -> EncodedCloud:
    """The EncodedCloud of the kept superpoints; only the fine head carries gradients (the PPF embedding is frozen)."""
    index = torch.as_tensor(keep)
    with torch.no_grad():
        geo = model.superpoint_geometry(cloud.superpoints[index], cloud.super_normals[index])
    return EncodedCloud(point_desc=model.fine_descriptors(cloud.point_feat), super_feat=cloud.super_feat[index], geo=geo)


def dual_softmax_nll(similarity: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """Overlap-weighted negative log dual-softmax of the true patch pairs (LoFTR's coarse loss): it trains the very
    scores `coarse_matches` ranks. The circle loss on distances lowered those scores' hit rate (docs/registration.md)."""
    logits = similarity / temperature
    log_scores = logits.log_softmax(dim=1) + logits.log_softmax(dim=0)
    return -(weight * log_scores).sum() / weight.sum().clamp_min(1e-6)


def pair_loss(model: RoITrLite, pair: dict[str, np.ndarray], frozen: tuple[FrozenCloud, FrozenCloud],
              cfg: TrainConfig, rng: np.random.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    """Coarse dual-softmax loss on superpoint descriptors + fine circle loss on point descriptors."""
    keep = [superpoint_subset(len(c.super_feat), cfg.max_superpoints, rng) for c in frozen]
    src, tgt = (complete(model, c, k) for c, k in zip(frozen, keep))
    fs, ft = model.match(src, tgt)
    overlap = torch.as_tensor(pair["overlap"][np.ix_(*keep)].astype(np.float32))
    coarse = dual_softmax_nll(fs @ ft.T, overlap * (overlap >= cfg.coarse_positive_overlap), cfg.coarse_temperature)

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


@torch.no_grad()
def coarse_inlier_ratio(model: RoITrLite, pair: dict[str, np.ndarray], frozen: tuple[FrozenCloud, FrozenCloud],
                        limit: int) -> float:
    """Share of the registrar's coarse matches (top-K dual-softmax) whose patches overlap in truth: what LGR needs."""
    keep = [superpoint_subset(len(c.super_feat), limit, None) for c in frozen]
    fs, ft = model.match(*(complete(model, c, k) for c, k in zip(frozen, keep)))
    si, ti = coarse_matches(fs, ft, MatchingConfig())
    overlap = pair["overlap"][np.ix_(*keep)]
    return float((overlap[si.numpy(), ti.numpy()] > 0).mean())


def pair_distance(pair: dict[str, np.ndarray]) -> float:
    return float(np.linalg.norm(pair["T"][:3, 3]))


def curriculum_distance(cfg: TrainConfig, epoch: int) -> float:
    """Widest pair distance used in `epoch`: from start_distance up to every pair (inf) after curriculum_epochs."""
    if epoch >= cfg.curriculum_epochs or cfg.start_distance >= MAX_PAIR_DISTANCE:
        return math.inf  # sensor height and tilt put a few "14 m" pairs just past it
    return cfg.start_distance + epoch / cfg.curriculum_epochs * (MAX_PAIR_DISTANCE - cfg.start_distance)


def cosine_lr(cfg: TrainConfig, progress: float) -> float:
    """Learning rate at `progress` epochs: a function of progress alone, so a resume (even with more epochs) continues it."""
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress / cfg.epochs)))


def validate(model: RoITrLite, pairs: list[dict], frozen: list[tuple[FrozenCloud, FrozenCloud]], cfg: TrainConfig
             ) -> dict[str, float]:
    """Coarse inlier ratio on the validation pairs, loops and 10-14 m pairs apart (all superpoints up to the registrar's cap)."""
    model.eval()
    ratios = {"loop": [], "odometry": []}
    for pair, clouds in zip(pairs, frozen):
        kind = "loop" if pair_distance(pair) <= 6.0 + 1e-6 else "odometry"
        ratios[kind].append(coarse_inlier_ratio(model, pair, clouds, cfg.preprocess.max_superpoints))
    model.train()
    return {f"val_cir_{kind}": float(np.mean(v)) for kind, v in ratios.items() if v}


def _start_model(cfg: TrainConfig, state_path: Path, resume: bool, log) -> tuple[RoITrLite, dict]:
    """The resumed model and its training state, or `init_weights` (whose encoders get frozen) and a fresh state."""
    if resume and state_path.exists():
        state = read_checkpoint(state_path)
        model = RoITrLite(ModelConfig(**state["model_config"]))
        model.load_state_dict(state["state_dict"])
        log(f"resumed {state_path} after epoch {state['extra']['epoch']}")
        return model, state["extra"]
    model, _ = load_model(cfg.init_weights, torch.device("cpu"))
    log(f"fresh run from {cfg.init_weights}")
    return model.train(), {"epoch": -1, "history": [], "best": None}


def train(cfg: TrainConfig, out_path: Path, resume: bool, log=print, state_path: Path | None = None,
          log_path: Path | None = None) -> dict:
    """Train the attention layers and heads; each epoch writes the resume state (model + optimiser + history) and the
    JSON log, and `out_path` whenever the validation coarse inlier ratio improves."""
    from bevplace_ros.atomic_io import atomic_write_bytes

    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    state_path = state_path or out_path.with_suffix(".state.pt")
    pairs = load_cache(build_cache(cfg, log))
    val_pairs = load_cache(build_cache(cfg, log, validation=True))
    model, extra = _start_model(cfg, state_path, resume, log)
    model.train()
    params = freeze_encoders(model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if "optimizer" in extra:
        opt.load_state_dict(extra["optimizer"])
    first_epoch, history, best = extra["epoch"] + 1, extra["history"], extra["best"]
    t0 = time.perf_counter()
    frozen = [encode_frozen(model, p) for p in pairs]
    val_frozen = [encode_frozen(model, p) for p in val_pairs]
    log(f"{len(pairs)} training pairs, {len(val_pairs)} validation pairs, encoded in {time.perf_counter() - t0:.0f} s; "
        f"{sum(p.numel() for p in params)} of {count_parameters(model)} parameters train")
    if best is None:
        best = validate(model, val_pairs, val_frozen, cfg)
        history.append({"epoch": first_epoch - 1, "init": cfg.init_weights, **best})
        log(json.dumps(history[-1]))
    distances = np.array([pair_distance(p) for p in pairs])
    epoch_minutes = 0.0
    for epoch in range(first_epoch, cfg.epochs):
        if epoch_minutes and (time.perf_counter() - start) / 60 + epoch_minutes > cfg.max_minutes:
            log(f"stopping before epoch {epoch}: it would pass max_minutes={cfg.max_minutes}")
            break
        epoch_start = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, epoch])
        reach = curriculum_distance(cfg, epoch)
        chosen = rng.permutation(np.nonzero(distances <= max(reach, distances.min()))[0])  # never an empty epoch
        sums = {"coarse": 0.0, "fine": 0.0}
        for step, index in enumerate(chosen):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(cfg, epoch + step / len(chosen))
            loss, parts = pair_loss(model, pairs[index], frozen[index], cfg, rng)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            for k in sums:
                sums[k] += parts[k] / len(chosen)
        train_s = time.perf_counter() - epoch_start
        val = validate(model, val_pairs, val_frozen, cfg)
        improved = sum(val.values()) > sum(best.values())
        epoch_minutes = (time.perf_counter() - epoch_start) / 60
        history.append({"epoch": epoch, "pairs": len(chosen), "max_distance": reach if reach < math.inf else None,
                        **sums, **val,
                        "train_s": train_s, "s_per_pair": train_s / len(chosen), "lr_end": opt.param_groups[0]["lr"],
                        "best": improved, "minutes": (time.perf_counter() - start) / 60})
        log(json.dumps(history[-1]))
        best = val if improved else best
        meta = {"train_config": json.loads(json.dumps(asdict(cfg))), "history": history,
                "parameters": count_parameters(model)}
        if improved:
            save_checkpoint(out_path, model, meta)
        save_checkpoint(state_path, model, meta, {"optimizer": opt.state_dict(), "epoch": epoch, "history": history,
                                                  "best": best})
        if log_path is not None:
            atomic_write_bytes(log_path, json.dumps(meta, indent=1).encode())
    return {"history": history, "parameters": count_parameters(model), "best": best}
