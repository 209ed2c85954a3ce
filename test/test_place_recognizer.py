"""The facade: numpy in, numpy out, one model for raw scans and published BEV images."""

from __future__ import annotations

import numpy as np
import pytest

from bevplace_ros.bev import make_bev
from bevplace_ros.datasets.bev_images import BEVDatasetError, BEVImageFolder
from bevplace_ros.models.checkpoint import DEFAULT_PLACE_WEIGHTS, EQUIVARIANT, CheckpointError, save_checkpoint
from bevplace_ros.models.bevplace_net import BEVPlaceNetConfig, build_seeded_model
from bevplace_ros.place_recognizer import PlaceFeatures, PlaceRecognizer, PlaceRecognizerConfig


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def recognizer() -> PlaceRecognizer:
    return PlaceRecognizer(PlaceRecognizerConfig(model=EQUIVARIANT, weights="random", rotations=4, device="cpu"))


@pytest.fixture(scope="module")
def scan(shared_data) -> np.ndarray:
    return np.fromfile(shared_data / "kitti_scans" / "000000.bin", dtype=np.float32).reshape(-1, 4)


def test_describe_returns_plain_numpy(recognizer, scan):
    feats = recognizer.describe(scan)
    assert isinstance(feats, PlaceFeatures)
    for arr in (feats.bev, feats.local, feats.descriptor, feats.keypoints.xy, feats.keypoints.descriptors):
        assert isinstance(arr, np.ndarray)
    assert feats.bev.shape == (151, 151) and feats.local.shape == (128, 20, 20)
    assert feats.descriptor.shape == (recognizer.descriptor_dim,) == (8192,)
    assert np.linalg.norm(feats.descriptor) == pytest.approx(1.0, abs=1e-5)
    assert len(feats.keypoints.xy) > 50


def test_scan_and_batched_images_agree(recognizer, scan, shared_data):
    folder = BEVImageFolder(shared_data / "kitti_bev" / "00")
    batch = np.stack([make_bev(scan), folder.image(0), folder.image(3000)])
    one_by_one = [recognizer.describe(scan)] + [recognizer.describe_images(img[None])[0] for img in batch[1:]]
    batched = recognizer.describe_images(batch)
    for a, b in zip(one_by_one, batched):
        np.testing.assert_allclose(a.descriptor, b.descriptor, atol=1e-5)


def test_a_raw_scan_resembles_its_published_image_more_than_a_far_frame(scan, shared_data):
    """With the shipped weights: random NetVLAD centroids make every descriptor nearly the same."""
    trained = PlaceRecognizer(PlaceRecognizerConfig(device="cpu"))
    folder = BEVImageFolder(shared_data / "kitti_bev" / "00")
    own, far, raw = trained.describe_images(np.stack([folder.image(0), folder.image(3000), make_bev(scan)]))
    assert raw.descriptor @ own.descriptor > raw.descriptor @ far.descriptor + 0.05


def test_identical_scans_give_identity_pose(recognizer, scan):
    feats = recognizer.describe(scan)
    pose = recognizer.relative_pose(feats, feats)
    assert pose is not None and pose.inliers == pose.matches == len(feats.keypoints.xy)
    assert abs(pose.x) < 1e-9 and abs(pose.y) < 1e-9 and abs(pose.yaw) < 1e-9


def test_weights_from_checkpoint_are_used(tmp_path, recognizer, scan):
    path = save_checkpoint(tmp_path / "place.pt", build_seeded_model(BEVPlaceNetConfig(rotations=4), seed=0))
    loaded = PlaceRecognizer(PlaceRecognizerConfig(model=EQUIVARIANT, weights=str(path), rotations=4, device="cpu"))
    np.testing.assert_allclose(loaded.describe(scan).descriptor, recognizer.describe(scan).descriptor, atol=1e-6)


def test_errors_are_clear(recognizer, tmp_path):
    with pytest.raises(ValueError, match=r"\(B, 151, 151\)"):
        recognizer.describe_images(np.zeros((1, 100, 100)))
    with pytest.raises(ValueError, match="rotations"):
        PlaceRecognizerConfig(rotations=0)
    with pytest.raises(ValueError, match="device"):
        PlaceRecognizerConfig(device="tpu")
    with pytest.raises(CheckpointError, match="not found"):
        PlaceRecognizer(PlaceRecognizerConfig(weights=str(tmp_path / "none.pt")))
    if not DEFAULT_PLACE_WEIGHTS.exists():
        with pytest.raises(CheckpointError, match="train place"):
            PlaceRecognizer(PlaceRecognizerConfig())
    with pytest.raises(BEVDatasetError, match="imgs"):
        BEVImageFolder(tmp_path)


def test_dataset_reads_lazily_with_poses(shared_data):
    folder = BEVImageFolder(shared_data / "kitti_bev" / "06")
    assert len(folder) == 1101 and folder.poses.shape == (1101, 4, 4)
    img = folder.image(1100)
    assert img.dtype == np.float32 and img.shape == (151, 151) and 0.0 <= img.min() and img.max() <= 1.0
    np.testing.assert_array_equal(np.unique(img), np.arange(11, dtype=np.float32) / 10)  # counts 0..10, same scale as make_bev


def test_the_bev_recipe_follows_the_model_unless_given():
    from bevplace_ros.bev import BEVConfig

    assert PlaceRecognizerConfig().bev == BEVConfig.preset("bevplace_kitti")  # the default model, the authors' v1
    assert PlaceRecognizerConfig(model=EQUIVARIANT).bev == BEVConfig()
    assert PlaceRecognizerConfig(bev=BEVConfig(z_min=-3.0)).bev.z_min == -3.0
