"""Metric learning of a place network: NetVLAD k-means init (or fine-tuning of a trained checkpoint,
such as the BEVPlace authors' v1 model, from its own centroids), per-epoch hard-negative mining over
a descriptor cache, random yaw + shift augmentation, Adam, a checkpoint per epoch, resume.

Every epoch draws its randomness from (seed, epoch), so a resumed run repeats exactly what an
uninterrupted one would have done, without storing generator states.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bevplace_ros.atomic_io import atomic_write_bytes
from bevplace_ros.evaluation.place_metrics import (
    descriptor_loop_matches,
    loop_recall_at_1,
    revisit_directions,
)
from bevplace_ros.models.bevplace_net import (
    BEVPlaceNetConfig,
    build_seeded_model,
    rotation_thetas,
)
from bevplace_ros.models.checkpoint import PlaceModel, load_checkpoint, save_checkpoint
from bevplace_ros.training.feature_bank import FeatureBank, local_feature_key
from bevplace_ros.training.losses import LOSSES, quadruplet_loss, triplet_loss
from bevplace_ros.training.mining import (
    MiningConfig,
    PlaceGraph,
    Tuple,
    mine_tuples,
    sample_epoch,
)
from bevplace_ros.training.place_dataset import PlaceSequence, cached_arrays

STATE_NAME = "train_state.pt"


@dataclass(frozen=True)
class AugmentConfig:
    max_yaw_deg: float = 180.0  # uniform in [-max, max]: the rotation group the network must absorb
    max_shift_m: float = 1.5  # uniform per axis: the sensor is never exactly on the old spot
    resolution_m: float = 0.4  # BEV cell size, converts the shift to pixels

    def __post_init__(self) -> None:
        if not 0 <= self.max_yaw_deg <= 180:
            raise ValueError(f"AugmentConfig.max_yaw_deg must be in [0, 180], got {self.max_yaw_deg}")
        if not 0 <= self.max_shift_m <= 10:
            raise ValueError(f"AugmentConfig.max_shift_m must be in [0, 10], got {self.max_shift_m}")
        if not self.resolution_m > 0:
            raise ValueError(f"AugmentConfig.resolution_m must be > 0, got {self.resolution_m}")


@dataclass(frozen=True)
class PlaceTrainConfig:
    epochs: int = 10
    lr: float = 1e-4
    weight_decay: float = 1e-4
    batch_tuples: int = 4  # tuples per optimiser step; each is 2 + negatives (+1 quadruplet) images
    loss: str = "triplet"
    margin: float = 0.3
    margin2: float = 0.15  # quadruplet second margin
    train_rotations: int = 1  # shared conv weights: yaw augmentation teaches the other rotations
    eval_rotations: int = 8  # stored in the checkpoint as the inference default
    val_rotations: int = 2
    clusters: int = 64
    kmeans_images: int = 100  # images whose local features initialise the NetVLAD centroids
    val_exclude_recent: int = 100  # frames
    encode_batch: int = 16
    seed: int = 0
    device: str = "auto"
    time_limit_min: float = 0.0  # >0: stop after the epoch that crosses it (checkpoints stay resumable)
    # False: keep the seeded backbone fixed and train NetVLAD only, on a FeatureBank of `bank_views`
    # views per frame (the first unaltered) at train_rotations; validation then runs at train_rotations too.
    train_backbone: bool = True
    bank_views: int = 2
    # "": a seeded BEVPlaceNet with k-means centroids; else a checkpoint to fine-tune (any model kind),
    # starting from its own NetVLAD, so that what it learnt elsewhere is the starting point.
    init: str = ""
    mining: MiningConfig = field(default_factory=MiningConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_tuples", "train_rotations", "eval_rotations", "val_rotations", "clusters", "kmeans_images", "encode_batch",
                     "bank_views"):
            if getattr(self, name) < 1:
                raise ValueError(f"PlaceTrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.loss not in LOSSES:
            raise ValueError(f"PlaceTrainConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        if not 0 < self.lr <= 1:
            raise ValueError(f"PlaceTrainConfig.lr must be in (0, 1], got {self.lr}")
        if not 0 < self.margin <= 2 or not 0 <= self.margin2 <= 2:
            raise ValueError(f"PlaceTrainConfig.margin must be in (0, 2] and margin2 in [0, 2], got {self.margin}, {self.margin2}")
        if self.val_exclude_recent < 0 or self.time_limit_min < 0 or self.weight_decay < 0:
            raise ValueError("PlaceTrainConfig.val_exclude_recent, time_limit_min and weight_decay must be >= 0")


@dataclass
class EpochReport:
    epoch: int
    loss: float
    tuples: int
    val_recall_at_1: float | None
    seconds: float


class PlaceTrainingSet:
    """Sequences concatenated into one frame table (uint8 images, positions, sequence ids)."""

    def __init__(self, sequences: list[PlaceSequence], mining: MiningConfig) -> None:
        if not sequences:
            raise ValueError("no training sequences")
        self.images = np.concatenate([s.images for s in sequences])
        positions = np.concatenate([s.positions for s in sequences])
        ids = np.concatenate([np.full(len(s), k) for k, s in enumerate(sequences)])
        self.graph = PlaceGraph(positions, ids, mining)
        self.names = [s.name for s in sequences]

    def tensor(self, frames: np.ndarray, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(self.images[frames].astype(np.float32) / 255.0)[:, None].to(device)


def augment(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Random yaw about the centre and random shift, one draw per image (zeros enter at borders)."""
    n, size = images.shape[0], images.shape[-1]
    yaw = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(cfg.max_yaw_deg)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (cfg.max_shift_m / cfg.resolution_m) * (2.0 / size)
    theta = rotation_thetas(yaw)
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@torch.no_grad()
def encode(model: PlaceModel, images: np.ndarray, batch: int, device: torch.device, rotations: int) -> np.ndarray:
    """(N, D) descriptors of uint8 images in eval mode at `rotations`; restores the model's mode."""
    was_training, kept = model.training, model.rotations
    model.eval()
    model.rotations = rotations
    out = []
    for start in range(0, len(images), batch):
        chunk = torch.from_numpy(images[start : start + batch].astype(np.float32) / 255.0)[:, None].to(device)
        out.append(model(chunk)[1].cpu().numpy())
    model.rotations = kept
    model.train(was_training)
    return np.concatenate(out)


@torch.no_grad()
def init_centroids(model: PlaceModel, data: PlaceTrainingSet, cfg: PlaceTrainConfig, device: torch.device) -> None:
    """k-means on normalised local features of random training images (NetVLAD's initialisation)."""
    import faiss

    rng = np.random.default_rng([cfg.seed, 7])
    frames = rng.choice(len(data.images), size=min(cfg.kmeans_images, len(data.images)), replace=False)
    model.eval()
    model.rotations = cfg.train_rotations
    feats = []
    for start in range(0, len(frames), cfg.encode_batch):
        local, _ = model(data.tensor(frames[start : start + cfg.encode_batch], device))
        feats.append(F.normalize(local, dim=1).permute(0, 2, 3, 1).reshape(-1, local.shape[1]).cpu().numpy())
    x = np.ascontiguousarray(np.concatenate(feats), dtype=np.float32)
    x = x[rng.choice(len(x), size=min(len(x), 256 * cfg.clusters), replace=False)]
    kmeans = faiss.Kmeans(x.shape[1], cfg.clusters, niter=25, seed=cfg.seed, verbose=False)
    kmeans.train(x)
    model.vlad.set_centroids(torch.from_numpy(kmeans.centroids).to(device))


def validate(model: PlaceModel, sequences: list[PlaceSequence], cfg: PlaceTrainConfig, device: torch.device,
             banks: list[FeatureBank] | None = None) -> float | None:
    """Threshold-free loop Recall@1 over the revisits of the validation sequences (pooled)."""
    hits, total = 0.0, 0
    for k, seq in enumerate(sequences):
        desc = banks[k].descriptors(model, device) if banks else encode(model, seq.images, cfg.encode_batch, device, cfg.val_rotations)
        directions = revisit_directions(seq.positions, seq.headings, cfg.val_exclude_recent, cfg.mining.pos_radius_m)
        recall = loop_recall_at_1(descriptor_loop_matches(desc, cfg.val_exclude_recent), seq.positions, directions, cfg.mining.pos_radius_m)
        if recall is not None:
            count = int((directions != "").sum())
            hits, total = hits + recall * count / 100.0, total + count
    return None if total == 0 else 100.0 * hits / total


def _step(model: PlaceModel, data: PlaceTrainingSet, batch: list[Tuple], cfg: PlaceTrainConfig, device: torch.device, generator: torch.Generator,
          bank: FeatureBank | None) -> torch.Tensor:
    k = cfg.mining.negatives
    frames = np.concatenate([[t.query for t in batch], [t.positive for t in batch], np.concatenate([t.negatives for t in batch]), [t.other for t in batch]])
    if cfg.loss == "triplet":
        frames = frames[: -len(batch)]
    if bank is None:
        _, desc = model(augment(data.tensor(frames, device), cfg.augment, generator))
    else:
        views = torch.randint(bank.augmentations, (len(frames),), generator=generator).numpy()
        desc = model.global_descriptor(bank.local(frames, views).to(device))
    b = len(batch)
    q, p, n = desc[:b], desc[b : 2 * b], desc[2 * b : 2 * b + b * k].view(b, k, -1)
    if cfg.loss == "triplet":
        return triplet_loss(q, p, n, cfg.margin)
    return quadruplet_loss(q, p, n, desc[2 * b + b * k :], cfg.margin, cfg.margin2)


def _save_state(work_dir: Path, model: PlaceModel, optimizer: torch.optim.Optimizer, history: list[EpochReport], cfg: PlaceTrainConfig) -> None:
    buffer = io.BytesIO()
    torch.save({"epoch": history[-1].epoch, "optimizer": optimizer.state_dict(), "history": [asdict(h) for h in history], "config": asdict(cfg)}, buffer)
    save_checkpoint(work_dir / f"epoch_{history[-1].epoch:03d}.pt", model)
    atomic_write_bytes(work_dir / STATE_NAME, buffer.getvalue())


def _resume(work_dir: Path, device: torch.device) -> tuple[PlaceModel, dict] | None:
    state_path = work_dir / STATE_NAME
    if not state_path.is_file():
        return None
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    model = load_checkpoint(work_dir / f"epoch_{state['epoch']:03d}.pt").to(device)
    return model, state


def train_place(
    train: list[PlaceSequence],
    val: list[PlaceSequence],
    cfg: PlaceTrainConfig,
    work_dir: Path,
    resume: bool = False,
    progress: Callable[[str], None] = print,
    bank_dir: Path | None = None,
) -> tuple[PlaceModel, list[EpochReport]]:
    """Train and return (the model of the best validation epoch, or the last without validation; history).
    bank_dir: where frozen-backbone feature banks are kept (default work_dir)."""
    from tqdm import tqdm

    from bevplace_ros.device import resolve_device

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    data = PlaceTrainingSet(train, cfg.mining)
    resumed = _resume(work_dir, device) if resume else None
    history: list[EpochReport] = []
    if resumed is None and cfg.init:
        model = load_checkpoint(cfg.init, rotations=cfg.eval_rotations).to(device)
    elif resumed is None:
        model = build_seeded_model(BEVPlaceNetConfig(rotations=cfg.eval_rotations, clusters=cfg.clusters), seed=cfg.seed).to(device)
        init_centroids(model, data, cfg, device)
    else:
        model, state = resumed
    trained = _trained_parameters(model, cfg.train_backbone)
    optimizer = torch.optim.Adam(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if resumed is not None:
        optimizer.load_state_dict(state["optimizer"])
        history = [EpochReport(**h) for h in state["history"]]
        progress(f"resumed after epoch {state['epoch']} from {work_dir}")
    model.rotations = cfg.train_rotations
    bank, val_banks = _feature_banks(model, train, val, cfg, device, bank_dir or work_dir, progress) if not cfg.train_backbone else (None, None)
    started = time.perf_counter()
    for epoch in range(len(history) + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, epoch])
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        queries, pool = sample_epoch(data.graph, rng)
        frames = np.concatenate([queries, pool])
        cached = encode(model, data.images[frames], cfg.encode_batch, device, cfg.train_rotations) if bank is None else bank.descriptors(model, device, frames)
        tuples = mine_tuples(data.graph, queries, pool, cached[: len(queries)], cached[len(queries) :], rng)
        model.train()
        model.rotations = cfg.train_rotations
        losses = []
        bar = tqdm(range(0, len(tuples), cfg.batch_tuples), desc=f"epoch {epoch}/{cfg.epochs}", unit="step", leave=False)
        for start in bar:
            loss = _step(model, data, tuples[start : start + cfg.batch_tuples], cfg, device, generator, bank)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
        recall = validate(model, val, cfg, device, val_banks) if val else None
        history.append(EpochReport(epoch, float(np.mean(losses)) if losses else float("nan"), len(tuples), recall, time.perf_counter() - t0))
        _save_state(work_dir, model, optimizer, history, cfg)
        shown = "n/a" if recall is None else f"{recall:.2f}"
        progress(f"epoch {epoch}/{cfg.epochs}: loss {history[-1].loss:.4f} over {len(tuples)} tuples, val Recall@1 {shown} %, {history[-1].seconds:.0f} s")
        if cfg.time_limit_min and time.perf_counter() - started > 60.0 * cfg.time_limit_min:
            progress(f"time limit {cfg.time_limit_min} min reached after epoch {epoch}; continue with --resume")
            break
    best = _best_epoch(history)
    final = load_checkpoint(work_dir / f"epoch_{best:03d}.pt", rotations=cfg.eval_rotations)
    return final, history


def _trained_parameters(model: PlaceModel, train_backbone: bool) -> list[torch.nn.Parameter]:
    """Everything that can learn, less the backbone when it is frozen (and parameters fixed by the
    model itself, such as the v1 NetVLAD's absent assignment bias)."""
    frozen = set() if train_backbone else {id(p) for p in model.backbone.parameters()}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in frozen]


def _feature_banks(model: PlaceModel, train: list[PlaceSequence], val: list[PlaceSequence], cfg: PlaceTrainConfig, device: torch.device,
                   bank_dir: Path, progress: Callable[[str], None]) -> tuple[FeatureBank, list[FeatureBank]]:
    """Banks of the training frames (cfg.bank_views views, seeded augmentations) and validation frames
    (unaltered), one per sequence in bank_dir: other runs over the same sequences skip the CNN pass."""
    digest = hashlib.sha1(json.dumps([asdict(cfg.augment), cfg.seed, local_feature_key(model)]).encode())

    def cached(seq: PlaceSequence, count: int) -> FeatureBank:
        key = hashlib.sha1(digest.digest() + seq.images.tobytes())
        views = partial(augment, cfg=cfg.augment, generator=torch.Generator().manual_seed(int.from_bytes(key.digest()[:6], "little")))

        def build() -> tuple[np.ndarray]:
            return (FeatureBank.build(model, seq.images, count, views, cfg.encode_batch, device, progress).features.numpy(),)

        name = f"bank-{key.hexdigest()[:16]}-{count}"
        progress(f"feature bank of {seq.name} ({len(seq)} frames x {count} views): {bank_dir / name}")
        return FeatureBank(torch.from_numpy(cached_arrays(bank_dir, name, ("features",), build)[0]))

    bank = FeatureBank(torch.cat([cached(seq, cfg.bank_views).features for seq in train]))
    return bank, [cached(seq, 1) for seq in val]


def _best_epoch(history: list[EpochReport]) -> int:
    """Highest validation recall, the later epoch on ties; the last epoch without validation."""
    scored = [h for h in history if h.val_recall_at_1 is not None]
    if not scored:
        return history[-1].epoch
    return max(scored, key=lambda h: (h.val_recall_at_1, h.epoch)).epoch
