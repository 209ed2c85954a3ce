"""BEVPlace v1, the authors' network: the shipped converted weights, equivalence with descriptors
of the authors' own code (test/fixtures/bevplace_v1_reference.npz), checkpoint errors, BEV pose."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from bevplace_ros.bev import BEVConfig
from bevplace_ros.cli import main as cli_main
from bevplace_ros.models.bevplace_net import BEVPlaceNetConfig, build_seeded_model
from bevplace_ros.models.bevplace_v1 import BEVPlaceV1, avg_pool_2x2, instance_norm_
from bevplace_ros.models.checkpoint import (
    DEFAULT_V1_WEIGHTS,
    V1,
    CheckpointError,
    load_checkpoint,
    load_place_model,
    save_checkpoint,
)
from bevplace_ros.place_recognizer import PlaceRecognizer, PlaceRecognizerConfig
from bevplace_ros.se3 import xyyaw_to_matrix

pytestmark = pytest.mark.usefixtures("torch_one_thread")

FIXTURE = Path(__file__).parent / "fixtures" / "bevplace_v1_reference.npz"
AUTHORS_CHECKPOINT = Path("bevplace_weights") / "checkpoint_paper_kitti.pth.tar"


@pytest.fixture(scope="module")
def recognizer() -> PlaceRecognizer:
    return PlaceRecognizer(PlaceRecognizerConfig(model=V1, device="cpu"))


def published_png(shared_data: Path, name: str) -> np.ndarray:
    """'kitti_bev/00/000015' -> the PNG / 255, as the authors' code reads it (grey level / 255)."""
    raw = cv2.imread(str(shared_data / f"{name.rsplit('/', 1)[0]}/imgs/{name.rsplit('/', 1)[1]}.png"), cv2.IMREAD_GRAYSCALE)
    assert raw is not None, name
    return raw.astype(np.float32) / 255.0


def sparse_bev(rng: np.random.Generator, count: int) -> np.ndarray:
    """(count, 151, 151) BEV-like images: 5 % occupied cells of density 0.1 ... 1."""
    return ((rng.random((count, 151, 151)) < 0.05) * rng.integers(1, 11, (count, 151, 151)) / 10).astype(np.float32)


def test_shipped_weights_give_a_finite_unit_descriptor(recognizer, rng):
    feats = recognizer.describe_images(sparse_bev(rng, 1))[0]
    assert feats.descriptor.shape == (recognizer.descriptor_dim,) == (8192,)
    assert np.isfinite(feats.descriptor).all() and abs(np.linalg.norm(feats.descriptor) - 1) < 1e-5
    assert feats.local.shape == (128, 29, 29)  # one feature per keypoint of the 5-pixel grid
    assert np.allclose(np.linalg.norm(feats.local, axis=0), 1, atol=1e-4)
    assert len(feats.keypoints.xy) > 0 and feats.keypoints.descriptors.shape[1] == 128


def test_all_zero_image_is_defined_and_wrong_size_is_refused(recognizer):
    empty = recognizer.describe_images(np.zeros((1, 151, 151), np.float32))[0]
    assert np.isfinite(empty.descriptor).all() and len(empty.keypoints.xy) == 0
    with pytest.raises(ValueError, match=r"\(B, 151, 151\)"):
        recognizer.describe_images(np.zeros((1, 100, 100), np.float32))
    with pytest.raises(ValueError, match="151, 151"):
        load_checkpoint(DEFAULT_V1_WEIGHTS)(torch.zeros(1, 1, 120, 120))


@pytest.mark.parametrize("size", [(151, 151), (214, 107)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_fast_norm_and_pool_equal_torch_modules(size, layout):
    x = (torch.randn(2, 5, *size) * 3 + 2).contiguous(memory_format=layout)  # mean well off 0, as convolution outputs
    want = torch.relu(torch.nn.functional.instance_norm(x))
    assert torch.allclose(instance_norm_(x.clone(), relu=True), want, atol=1e-5)
    assert torch.allclose(instance_norm_(x.clone(), relu=False), torch.nn.functional.instance_norm(x), atol=1e-5)
    assert torch.allclose(avg_pool_2x2(x), torch.nn.AvgPool2d(2, 2)(x), atol=1e-6)


def test_inference_copy_keeps_the_float32_network_and_its_outputs(rng):
    """for_inference() (bfloat16 group CNN and light-CNN convolutions 2-4, in-place norms) stays
    within cosine 0.9999 of the float32 network and leaves the network it copies untouched."""
    eager = load_checkpoint(DEFAULT_V1_WEIGHTS).eval()
    before = {k: v.clone() for k, v in eager.state_dict().items()}
    fast = eager.for_inference()
    assert next(fast.encoder.embedder.parameters()).dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 and torch.equal(v, before[k]) for k, v in eager.state_dict().items())
    x = torch.from_numpy(sparse_bev(rng, 2))[:, None]
    with torch.inference_mode():
        (local_e, global_e), (local_f, global_f) = eager(x), fast(x)
    assert (global_e * global_f).sum(1).min() >= 0.9999
    assert (local_e * local_f).sum(1).min() >= 0.999


def test_checkpoints_of_other_networks_are_refused_naming_file_and_tensor(tmp_path):
    foreign = tmp_path / "resnet.pth.tar"
    torch.save({"epoch": 3, "state_dict": {"conv1.weight": torch.zeros(64, 3, 7, 7)}}, foreign)
    with pytest.raises(CheckpointError, match=r"resnet\.pth\.tar.*not a BEVPlace v1 checkpoint.*'conv1\.weight'"):
        load_checkpoint(foreign)
    state = BEVPlaceV1().state_dict()
    state["encoder.extractor.extractor.conv0.0.weight"] = torch.zeros(16, 1, 5, 5)
    wrong = tmp_path / "wrong_shape.pth.tar"
    torch.save({"state_dict": state}, wrong)
    with pytest.raises(CheckpointError, match=r"wrong_shape.*'encoder\.extractor\.extractor\.conv0\.0\.weight' is \(16, 1, 5, 5\)"):
        load_checkpoint(wrong)
    del state["encoder.extractor.extractor.conv0.0.weight"]
    torch.save({"state_dict": state}, wrong)
    with pytest.raises(CheckpointError, match="conv0.0.weight' missing"):
        load_checkpoint(wrong)
    ours = save_checkpoint(tmp_path / "equivariant.pt", build_seeded_model(BEVPlaceNetConfig(rotations=2)))
    with pytest.raises(CheckpointError, match="'bevplace_equivariant' network, but the model asked for is 'bevplace_v1'"):
        load_place_model(ours, kind=V1)
    with pytest.raises(SystemExit, match="already a bevplace_ros place checkpoint"):
        cli_main(["convert-weights", str(ours), "--out", str(tmp_path / "x.pt")])


def test_converted_file_round_trips_and_old_files_still_load(tmp_path):
    model = load_checkpoint(DEFAULT_V1_WEIGHTS)
    assert isinstance(model, BEVPlaceV1) and model.descriptor_dim == 8192
    again = load_checkpoint(save_checkpoint(tmp_path / "v1.pt", model))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    legacy = build_seeded_model(BEVPlaceNetConfig(rotations=2))
    payload = {"format": "bevplace_ros.place_checkpoint", "format_version": 1, "config": legacy.cfg.to_dict(),
               "state_dict": legacy.state_dict(), "pca": None}  # version 1: no model kind
    torch.save(payload, tmp_path / "v1_format.pt")
    assert load_checkpoint(tmp_path / "v1_format.pt").kind == "bevplace_equivariant"


def test_authors_checkpoint_loads_directly_and_converts_to_the_shipped_file(shared_data, tmp_path):
    source = shared_data / AUTHORS_CHECKPOINT
    direct = load_place_model(source, kind=V1)
    assert cli_main(["convert-weights", str(source), "--out", str(tmp_path / "converted.pt")]) == 0
    for model in (load_checkpoint(tmp_path / "converted.pt"), load_checkpoint(DEFAULT_V1_WEIGHTS)):
        assert all(torch.equal(a, b) for a, b in zip(direct.state_dict().values(), model.state_dict().values()))


def test_place_map_runs_the_chosen_model_and_refuses_weights_of_the_other(tmp_path):
    from bevplace_ros.loop_detector import LoopDetectorConfig
    from bevplace_ros.place_map import PlaceMap, PlaceMapConfig

    place_map = PlaceMap(PlaceMapConfig(model=V1, device="cpu"), BEVConfig(), LoopDetectorConfig())
    assert place_map.detector.recognizer.model.kind == V1 and place_map.detector.recognizer.descriptor_dim == 8192
    ours = save_checkpoint(tmp_path / "equivariant.pt", build_seeded_model(BEVPlaceNetConfig(rotations=2)))
    with pytest.raises(CheckpointError, match="equivariant.pt: holds a 'bevplace_equivariant' network"):
        PlaceMap(PlaceMapConfig(model=V1, weights=str(ours), device="cpu"), BEVConfig(), LoopDetectorConfig())


@pytest.mark.slow
def test_descriptors_match_the_authors_code(recognizer, shared_data):
    """20 published images (plain and rotated, KITTI 00 and 06): cosine >= 0.9999 to the descriptors
    the authors' code computed with their checkpoint (see the fixture's 'how')."""
    ref = np.load(FIXTURE)
    assert len(ref["frames"]) >= 20 and "unmodified" in str(ref["how"])
    images = np.stack([published_png(shared_data, str(name)) for name in ref["frames"]])
    ours = np.stack([f.descriptor for f in recognizer.describe_images(images)])
    cosine = (ours * ref["descriptors"].astype(np.float32)).sum(axis=1) / np.linalg.norm(ref["descriptors"].astype(np.float32), axis=1)
    assert cosine.min() >= 0.9999, dict(zip(ref["frames"], cosine.round(6)))


@pytest.mark.parametrize("x, y, yaw_deg", [(2.0, -1.5, 30.0), (-1.2, 2.4, -65.0)])
def test_bev_pose_recovers_a_rotated_and_shifted_published_image(recognizer, shared_data, x, y, yaw_deg):
    """Image b = published image a seen from a sensor at T_a_b (nearest-neighbour resampling)."""
    bev = BEVConfig()
    image_a = published_png(shared_data, "kitti_bev/00/000100")
    T_a_b = xyyaw_to_matrix(x, y, np.radians(yaw_deg))
    rows, cols = np.mgrid[0:151, 0:151].astype(np.float64)
    xy_b = bev.pixel_to_xy(rows.ravel(), cols.ravel())
    xy_a = xy_b @ T_a_b[:2, :2].T + T_a_b[:2, 3]
    c = bev.half_cells
    map_rows = (c - xy_a[:, 0] / bev.resolution).reshape(151, 151).astype(np.float32)
    map_cols = (c - xy_a[:, 1] / bev.resolution).reshape(151, 151).astype(np.float32)
    image_b = cv2.remap(image_a, map_cols, map_rows, cv2.INTER_NEAREST, borderValue=0)
    a, b = recognizer.describe_images(np.stack([image_a, image_b]))
    pose = recognizer.relative_pose(a, b)
    assert pose is not None and pose.inliers >= 10
    assert np.hypot(pose.x - x, pose.y - y) < 0.5 and abs(np.degrees(pose.yaw) - yaw_deg) < 2.0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine: CPU/CUDA agreement of BEVPlace v1 untested")
def test_cpu_and_cuda_agree(rng):
    """Each device's inference copy (bfloat16 parts) within cosine 0.9999 of the float32 network on the CPU."""
    image = sparse_bev(rng, 2)
    with torch.inference_mode():
        want = load_checkpoint(DEFAULT_V1_WEIGHTS).eval()(torch.from_numpy(image)[:, None])[1].numpy()
    for device in ("cpu", "cuda"):
        got = np.stack([f.descriptor for f in PlaceRecognizer(PlaceRecognizerConfig(model=V1, device=device)).describe_images(image)])
        assert (got * want).sum(axis=1).min() >= 0.9999, device
