"""Save/load RoITr-lite weights with their model config, failing loudly on anything unusable."""

from __future__ import annotations

import io
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from bevplace_ros.atomic_io import atomic_write_bytes
from bevplace_ros.registration.errors import RegistrationCheckpointError
from bevplace_ros.registration.model import ModelConfig, RoITrLite

FORMAT = "bevplace_ros/roitr_lite/1"
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "roitr_lite.pt"


def save_checkpoint(path: str | Path, model: RoITrLite, meta: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """Atomically write weights + config + free-form metadata (`extra` holds optimiser state for resume)."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "model_config": asdict(model.cfg), "state_dict": model.state_dict(),
                "meta": meta, "extra": extra or {}}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict, or RegistrationCheckpointError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise RegistrationCheckpointError(f"registration weights not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated/corrupt zips
        raise RegistrationCheckpointError(f"registration weights at {path} are unreadable: {err}") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise RegistrationCheckpointError(f"{path} is not a {FORMAT} checkpoint")
    return data


def load_model(path: str | Path, device: torch.device) -> tuple[RoITrLite, dict[str, Any]]:
    """Build the model described by the checkpoint and load its weights, in eval mode on `device`."""
    data = read_checkpoint(path)
    try:
        model = RoITrLite(ModelConfig(**data["model_config"]))
        model.load_state_dict(data["state_dict"])
    except (TypeError, ValueError, RuntimeError, KeyError) as err:
        raise RegistrationCheckpointError(f"weights at {path} do not fit RoITrLite: {err}") from err
    return model.to(device).eval(), data.get("meta", {})
