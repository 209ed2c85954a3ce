"""Place-network checkpoints: one file holding format version, model config, weights, PCA."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import torch

from bevplace_ros.atomic_io import atomic_write_bytes
from bevplace_ros.models.bevplace_net import BEVPlaceNet, BEVPlaceNetConfig, build_seeded_model

FORMAT_NAME = "bevplace_ros.place_checkpoint"
FORMAT_VERSION = 1
DEFAULT_PLACE_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "bevplace_place.pt"
RANDOM_WEIGHTS = "random"
_HOW_TO_GET = "train one with `bevplace-ros train place` (writes the default path) or pass weights='random' for an untrained seeded model"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, of another format/version, or does not fit the model."""


def save_checkpoint(path: str | Path, model: BEVPlaceNet) -> Path:
    """Write atomically, so a crash mid-save never leaves a half checkpoint at `path`."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("projection.")}
    pca = None
    if model.projection is not None:
        pca = {"weight": model.projection.weight.detach().cpu(), "bias": model.projection.bias.detach().cpu()}
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": model.cfg.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in state.items()},
        "pca": pca,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def _read_payload(path: Path) -> dict:
    if not path.is_file():
        hint = f"; {_HOW_TO_GET}" if path == DEFAULT_PLACE_WEIGHTS else ""
        raise CheckpointError(f"place checkpoint not found: {path}{hint}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable torch checkpoint (corrupt or truncated?): {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not a bevplace_ros place checkpoint (format tag missing)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {payload.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    return payload


def load_checkpoint(path: str | Path = DEFAULT_PLACE_WEIGHTS, rotations: int | None = None) -> BEVPlaceNet:
    """Model in eval mode; `rotations` overrides the stored inference rotation count."""
    path = Path(path)
    payload = _read_payload(path)
    try:
        stored = dict(payload["config"])
        stored.pop("pca_dim", None)
        stored.setdefault("input_blur_px", 0.0)  # files from before the blur existed were trained without it
        if rotations is not None:
            stored["rotations"] = rotations
        model = BEVPlaceNet(BEVPlaceNetConfig(**stored))
        model.load_state_dict(payload["state_dict"], strict=True)
        if payload["pca"] is not None:
            model.set_projection(payload["pca"]["weight"].numpy(), payload["pca"]["bias"].numpy())
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: checkpoint lacks or garbles a field: {err}") from err
    except RuntimeError as err:  # load_state_dict: missing/unexpected keys or size mismatch
        raise CheckpointError(f"{path}: weights do not fit the model (shape or key mismatch): {err}") from err
    return model.eval()


def load_place_model(weights: str | Path | None = DEFAULT_PLACE_WEIGHTS, rotations: int = 8, seed: int = 0) -> BEVPlaceNet:
    """Trained model from `weights`, or an untrained seeded one for None / 'random' (baselines, tests)."""
    if weights is None or weights == RANDOM_WEIGHTS:
        return build_seeded_model(BEVPlaceNetConfig(rotations=rotations), seed=seed)
    return load_checkpoint(weights, rotations=rotations)
