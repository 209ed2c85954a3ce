"""Place-network checkpoints: one file holding format version, model kind, config, weights, PCA.

Two model kinds share the format: "bevplace_equivariant" (BEVPlaceNet, the package's own) and
"bevplace_v1" (the BEVPlace authors' network). Version-1 files predate the kind field and are all
BEVPlaceNet. A checkpoint in the authors' own layout (`*.pth.tar`: `epoch` + `state_dict`) loads
directly too, through `load_authors_checkpoint`.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import torch

from bevplace_ros.atomic_io import atomic_write_bytes
from bevplace_ros.models.bevplace_net import BEVPlaceNet, BEVPlaceNetConfig, build_seeded_model
from bevplace_ros.models.bevplace_v1 import BEVPlaceV1, BEVPlaceV1Config

FORMAT_NAME = "bevplace_ros.place_checkpoint"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
EQUIVARIANT = BEVPlaceNet.kind
V1 = BEVPlaceV1.kind
MODEL_KINDS = (EQUIVARIANT, V1)
DEFAULT_MODEL = V1  # wins on KITTI 00/06, plain and rotated, and on the held-out simulator world (README)
# the BEV recipe (bev.BEV_PRESETS) each kind's shipped weights were trained on
BEV_PRESET_OF_MODEL = {EQUIVARIANT: "default", V1: "bevplace_kitti"}
_WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
DEFAULT_PLACE_WEIGHTS = _WEIGHTS_DIR / "bevplace_place.pt"
DEFAULT_V1_WEIGHTS = _WEIGHTS_DIR / "bevplace_v1_kitti.pt"  # converted from the authors' paper checkpoint
DEFAULT_WEIGHTS = {EQUIVARIANT: DEFAULT_PLACE_WEIGHTS, V1: DEFAULT_V1_WEIGHTS}
RANDOM_WEIGHTS = "random"
_HOW_TO_GET = "train one with `bevplace-ros train place` (writes the default path) or pass weights='random' for an untrained seeded model"
# The authors' key -> ours (NetVLAD's assignment is `assign` here, with a bias they do not have).
_AUTHORS_RENAMES = {"netvlad.centroids": "vlad.centroids", "netvlad.conv.weight": "vlad.assign.weight"}
# Parameters of the authors' NetVLAD module that their published forward never uses.
_AUTHORS_UNUSED = ("netvlad.wq.", "netvlad.wk.", "netvlad.mean", "netvlad.bias", "netvlad.transformer.")

PlaceModel = BEVPlaceNet | BEVPlaceV1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, of another format/version, or does not fit the model."""


def save_checkpoint(path: str | Path, model: PlaceModel, source: str | None = None) -> Path:
    """Write atomically, so a crash mid-save never leaves a half checkpoint at `path`.
    `source` records where converted weights came from."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("projection.")}
    projection = getattr(model, "projection", None)
    pca = None if projection is None else {"weight": projection.weight.detach().cpu(), "bias": projection.bias.detach().cpu()}
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_kind": model.kind,
        "config": model.cfg.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in state.items()},
        "pca": pca,
        "source": source,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def _torch_load(path: Path) -> object:
    if not path.is_file():
        hint = f"; {_HOW_TO_GET}" if path == DEFAULT_PLACE_WEIGHTS else ""
        raise CheckpointError(f"place checkpoint not found: {path}{hint}")
    try:  # weights_only: never runs code from the file (the authors' checkpoints load this way too)
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable torch checkpoint (corrupt or truncated?): {err}") from err


def is_authors_payload(payload: object) -> bool:
    """The authors' layout: a dict with `state_dict` and no format tag of ours."""
    return isinstance(payload, dict) and "format" not in payload and isinstance(payload.get("state_dict"), dict)


def _read_payload(path: Path) -> dict:
    payload = _torch_load(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not a bevplace_ros place checkpoint (format tag missing)")
    if payload.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: checkpoint format version {payload.get('format_version')!r}, this code reads {READABLE_VERSIONS}")
    return payload


def v1_state_from_authors(state: dict, path: Path) -> dict:
    """The authors' state dict in our key layout; a clear error at the first tensor that does not fit.

    Their unused NetVLAD parameters (wq, wk, mean, bias, transformer) are dropped; a DataParallel
    `module.` prefix is stripped; the assignment bias they lack is zero.
    """
    expected = BEVPlaceV1().state_dict()
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith(_AUTHORS_UNUSED):
            continue
        ours = _AUTHORS_RENAMES.get(key, key)
        if ours not in expected:
            raise CheckpointError(f"{path}: not a BEVPlace v1 checkpoint: unexpected tensor {key!r}")
        if not isinstance(value, torch.Tensor) or value.shape != expected[ours].shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(f"{path}: not a BEVPlace v1 checkpoint: tensor {key!r} is {shape}, the network needs {tuple(expected[ours].shape)}")
        out[ours] = value.float()
    out.setdefault("vlad.assign.bias", torch.zeros_like(expected["vlad.assign.bias"]))
    missing = [k for k in expected if k not in out]
    if missing:
        raise CheckpointError(f"{path}: not a BEVPlace v1 checkpoint: tensor {missing[0]!r} missing ({len(missing)} of {len(expected)} missing)")
    return out


def load_authors_checkpoint(path: str | Path) -> BEVPlaceV1:
    """A checkpoint written by the authors' training code (e.g. checkpoint_paper_kitti.pth.tar)."""
    path = Path(path)
    payload = _torch_load(path)
    if isinstance(payload, dict) and payload.get("format") == FORMAT_NAME:
        raise CheckpointError(f"{path}: already a bevplace_ros place checkpoint ({payload.get('model_kind', EQUIVARIANT)}), not the authors' layout")
    if not is_authors_payload(payload):
        raise CheckpointError(f"{path}: not a BEVPlace v1 checkpoint (the authors' layout is a dict with a 'state_dict')")
    model = BEVPlaceV1()
    model.load_state_dict(v1_state_from_authors(payload["state_dict"], path), strict=True)
    return model.eval()


def _build(kind: str, stored: dict, rotations: int | None) -> PlaceModel:
    if kind == V1:
        return BEVPlaceV1(BEVPlaceV1Config(**stored))  # fixed 5 x 5 group: `rotations` does not apply
    stored.pop("pca_dim", None)
    stored.setdefault("input_blur_px", 0.0)  # files from before the blur existed were trained without it
    if rotations is not None:
        stored["rotations"] = rotations
    return BEVPlaceNet(BEVPlaceNetConfig(**stored))


def load_checkpoint(path: str | Path = DEFAULT_PLACE_WEIGHTS, rotations: int | None = None) -> PlaceModel:
    """Model in eval mode, of the kind the file records; `rotations` overrides the stored inference
    rotation count of BEVPlaceNet. An authors' checkpoint is accepted too."""
    path = Path(path)
    payload = _torch_load(path)
    if is_authors_payload(payload):
        return load_authors_checkpoint(path)
    payload = _read_payload(path)
    kind = payload.get("model_kind", EQUIVARIANT)
    if kind not in MODEL_KINDS:
        raise CheckpointError(f"{path}: model kind {kind!r} unknown, this code has {MODEL_KINDS}")
    try:
        model = _build(kind, dict(payload["config"]), rotations)
        model.load_state_dict(payload["state_dict"], strict=True)
        if payload["pca"] is not None:
            model.set_projection(payload["pca"]["weight"].numpy(), payload["pca"]["bias"].numpy())
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path}: checkpoint lacks or garbles a field: {err}") from err
    except RuntimeError as err:  # load_state_dict: missing/unexpected keys or size mismatch
        raise CheckpointError(f"{path}: weights do not fit the model (shape or key mismatch): {err}") from err
    return model.eval()


def shipped_weights(weights: str | Path, kind: str) -> Path:
    """`weights`, or the shipped file of model `kind` when empty."""
    return Path(weights) if str(weights) else DEFAULT_WEIGHTS[kind]


def load_place_model(weights: str | Path | None = DEFAULT_PLACE_WEIGHTS, rotations: int = 8, seed: int = 0, kind: str | None = None) -> PlaceModel:
    """Trained model from `weights`, or an untrained seeded one for None / 'random' (baselines,
    tests). `kind`, when given, must be the file's model kind (and picks the untrained network)."""
    if kind is not None and kind not in MODEL_KINDS:
        raise CheckpointError(f"model kind {kind!r} unknown, choose one of {MODEL_KINDS}")
    if weights is None or weights == RANDOM_WEIGHTS:
        if kind == V1:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return BEVPlaceV1().eval()
        return build_seeded_model(BEVPlaceNetConfig(rotations=rotations), seed=seed)
    model = load_checkpoint(weights, rotations=rotations)
    if kind is not None and model.kind != kind:
        raise CheckpointError(f"{weights}: holds a {model.kind!r} network, but the model asked for is {kind!r}")
    return model
