"""Local features of every frame under a few fixed augmentations, computed once by a frozen backbone.

With the backbone frozen, the group convolution (R rotated copies through the CNN) is nearly the
whole cost of a training step, and it does not change between epochs. Running each image through
it once and training NetVLAD on the stored maps makes a tuple cost milliseconds instead of
seconds on a CPU, so many more tuples and epochs fit in the same time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bevplace_ros.models.checkpoint import PlaceModel
from bevplace_ros.training.place_dataset import PlaceSequence, SequenceSpec, cached_arrays, sequence_cache_key


def local_feature_key(model: PlaceModel) -> str:
    """Changes with anything that changes the local features: the network code, backbone weights,
    input blur, rotations (not NetVLAD, so weights that share a backbone share cached features)."""
    import bevplace_ros.models as models

    digest = hashlib.sha1(f"blur={model.cfg.input_blur_px} rotations={model.rotations}".encode())
    for source in sorted(Path(models.__file__).parent.glob("*.py")):
        digest.update(source.read_bytes())
    for tensor in model.backbone.state_dict().values():
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class FeatureBank:
    """(N, A, C, h, w) float16 local features; augmentation 0 is the unaltered image."""

    def __init__(self, features: torch.Tensor) -> None:
        if features.ndim != 5:
            raise ValueError(f"feature bank must be (N, A, C, h, w), got {tuple(features.shape)}")
        self.features = features

    @property
    def augmentations(self) -> int:
        return self.features.shape[1]

    @classmethod
    @torch.no_grad()
    def build(cls, model: PlaceModel, images: np.ndarray, augmentations: int, augment: Callable[[torch.Tensor], torch.Tensor],
              batch: int, device: torch.device, progress: Callable[[str], None] | None = None) -> FeatureBank:
        """Run uint8 images (N, H, W) through the model's backbone at its current rotations."""
        fast = model.for_inference().to(device)  # BN folded: same features, less time
        chunks = []
        for start in range(0, len(images), batch):
            x = torch.from_numpy(images[start : start + batch].astype(np.float32) / 255.0)[:, None].to(device)
            views = [x] + [augment(x) for _ in range(augmentations - 1)]
            chunks.append(torch.stack([fast.local_features(v) for v in views], dim=1).half().cpu())
            if progress and (start // batch) % 50 == 0:
                progress(f"feature bank: {min(start + batch, len(images))}/{len(images)} frames x {augmentations} views")
        return cls(torch.cat(chunks))

    def local(self, frames: np.ndarray, views: np.ndarray | None = None) -> torch.Tensor:
        """float32 maps of `frames`, view 0 or the given view per frame."""
        frames = torch.as_tensor(np.asarray(frames, dtype=np.int64))
        chosen = torch.zeros_like(frames) if views is None else torch.as_tensor(np.asarray(views, dtype=np.int64))
        return self.features[frames, chosen].float()

    @torch.no_grad()
    def descriptors(self, model: PlaceModel, device: torch.device, frames: np.ndarray | None = None, batch: int = 256) -> np.ndarray:
        """(len(frames), D) global descriptors of the unaltered views (all frames by default) through the model's NetVLAD."""
        frames = np.arange(len(self.features)) if frames is None else np.asarray(frames)
        out = [model.global_descriptor(self.local(frames[s : s + batch]).to(device)).cpu().numpy() for s in range(0, len(frames), batch)]
        return np.concatenate(out)


def sequence_local_features(model: PlaceModel, seq: PlaceSequence, spec: SequenceSpec, cache_dir: Path, batch: int,
                            device: torch.device) -> np.ndarray:
    """(N, C, h, w) float16 local features of every frame of `seq`, unaltered, cached per (sequence,
    local_feature_key): every command that evaluates the same backbone on the same frames pays once."""
    def compute() -> tuple[np.ndarray]:
        return (FeatureBank.build(model, seq.images, 1, lambda x: x, batch, device).features[:, 0].numpy(),)

    return cached_arrays(cache_dir, f"{sequence_cache_key(spec)}-local-{local_feature_key(model)}", ("local_float16",), compute)[0]
