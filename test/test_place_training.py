"""Place training: data specs and cache, mining, losses, augmentation, and a tiny deterministic
train / resume run with real torch and faiss. Also the shipped weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bevplace_ros.bev import BEVConfig
from bevplace_ros.models.bevplace_net import BEVPlaceNetConfig, build_seeded_model
from bevplace_ros.models.bevplace_v1 import BEVPlaceV1, BEVPlaceV1Config
from bevplace_ros.models.checkpoint import (
    DEFAULT_PLACE_WEIGHTS,
    DEFAULT_V1_WEIGHTS,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from bevplace_ros.training.losses import quadruplet_loss, triplet_loss
from bevplace_ros.training.mining import MiningConfig, PlaceGraph, mine_tuples
from bevplace_ros.training.place_dataset import (
    PlaceDataError,
    PlaceSequence,
    SequenceSpec,
    load_sequence,
)
from bevplace_ros.training.place_trainer import (
    AugmentConfig,
    PlaceTrainConfig,
    augment,
    train_place,
)


def test_sequence_spec_parsing():
    spec = SequenceSpec.parse("data/kitti_bev/00@0:3000")
    assert (spec.path, spec.start, spec.end) == (Path("data/kitti_bev/00"), 0, 3000)
    assert SequenceSpec.parse("x@5:").end is None and SequenceSpec.parse("x").start == 0
    stepped = SequenceSpec.parse("x@0:3000:3")
    assert (stepped.end, stepped.step, str(stepped)) == (3000, 3, "x@0:3000:3")
    with pytest.raises(PlaceDataError, match="END"):
        SequenceSpec.parse("x@5:3")


def _kitti_folder(root: Path, rng: np.random.Generator, with_poses: bool = True, frames: int = 6) -> Path:
    (root / "velodyne").mkdir(parents=True)
    poses = []
    for i in range(frames):
        pts = np.column_stack([rng.uniform(-20, 20, (500, 2)), rng.uniform(-1.4, 0.9, 500), np.ones(500)]).astype(np.float32)
        pts[:, 0] -= 2.0 * i  # the same random world seen from 2 m further each frame
        pts.tofile(root / "velodyne" / f"{i:06d}.bin")
        poses.append([1, 0, 0, 2.0 * i, 0, 1, 0, 0, 0, 0, 1, 0])
    if with_poses:
        np.savetxt(root / "poses.txt", np.array(poses))
    return root


def test_load_sequence_renders_once_and_reads_the_cache(tmp_path, rng):
    data = _kitti_folder(tmp_path / "seq", rng)
    first = load_sequence(f"{data}@1:5", cache_dir=tmp_path / "cache")
    assert first.images.dtype == np.uint8 and first.images.shape == (4, 151, 151)
    np.testing.assert_array_equal(first.frame_ids, [1, 2, 3, 4])
    every_other = load_sequence(f"{data}@1:5:2", cache_dir=tmp_path / "cache2")
    np.testing.assert_array_equal(every_other.frame_ids, [1, 3])
    np.testing.assert_array_equal(every_other.images, first.images[::2])
    np.testing.assert_allclose(first.positions[:, 0], [2, 4, 6, 8])
    assert len(list((tmp_path / "cache").glob("*/images.npy"))) == 1
    for scan in (data / "velodyne").glob("*.bin"):  # emptied in place: the cache must answer, not the scans
        scan.write_bytes(b"")
    cached = load_sequence(f"{data}@1:5", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(cached.images, first.images)
    import os

    os.utime(data / "poses.txt", ns=(0, 10**18))  # a changed data set is rendered again
    assert load_sequence(f"{data}@1:5", cache_dir=tmp_path / "cache").images.max() == 0


def test_load_sequence_needs_ground_truth(tmp_path, rng):
    data = _kitti_folder(tmp_path / "seq", rng, with_poses=False)
    with pytest.raises(PlaceDataError, match="ground-truth"):
        load_sequence(str(data), cache_dir=tmp_path / "cache")
    with pytest.raises(PlaceDataError, match="not a rosbag2"):
        load_sequence(str(tmp_path), cache_dir=tmp_path / "cache")


def test_bev_folder_round_trip_is_exact(tmp_path, shared_data):
    seq = load_sequence(f"{shared_data / 'kitti_bev' / '06'}@0:5", cache_dir=tmp_path)
    import cv2

    png = cv2.imread(str(shared_data / "kitti_bev" / "06" / "imgs" / "000003.png"), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(seq.images[3], png)
    assert seq.images.shape == (5, BEVConfig().size, BEVConfig().size)


def test_place_graph_and_hard_negative_mining(rng):
    cfg = MiningConfig(pos_radius_m=5, neg_radius_m=25, negatives=2, queries_per_epoch=4, pool_size=10)
    positions = np.column_stack([np.arange(0, 100, 3.0), np.zeros(34), np.zeros(34)])
    positions = np.concatenate([positions, positions[:5]])  # a second sequence at the same coordinates
    seq_ids = np.r_[np.zeros(34, int), np.ones(5, int)]
    graph = PlaceGraph(positions, seq_ids, cfg)
    np.testing.assert_array_equal(np.sort(graph.positives(10)), [9, 11])
    mask = graph.negative_mask(np.array([0]), np.array([1, 9, 34]))
    np.testing.assert_array_equal(mask[0], [False, True, True])  # 34: same coordinates, other world
    pool = np.array([1, 2, 20, 25, 30, 34])
    desc = rng.normal(size=(len(pool), 8))
    query_desc = desc[[3]] + 0.01  # closest to frame 25 in descriptor space, then whatever is next
    tuples = mine_tuples(graph, np.array([0]), pool, query_desc, desc, rng)
    assert len(tuples) == 1
    t = tuples[0]
    assert t.negatives[0] == 25 and t.positive == 1
    assert set(t.negatives) <= {20, 25, 30, 34} and t.other not in (1, 2, 25)
    with pytest.raises(ValueError, match="pos_radius_m"):
        MiningConfig(pos_radius_m=30, neg_radius_m=25)


def test_losses_vanish_only_when_the_margin_is_met():
    q = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[0.99, 0.14]])
    far, near = torch.tensor([[[-1.0, 0.0]]]), torch.tensor([[[0.95, 0.31]]])
    assert float(triplet_loss(q, p, far, margin=0.3)) == 0.0
    assert float(triplet_loss(q, p, near, margin=0.3)) > 0.0
    other = torch.tensor([[0.9, 0.44]])  # close to the negative: the second quadruplet term fires
    assert float(quadruplet_loss(q, p, far, -far[:, 0], 0.3, 0.15)) == 0.0
    assert float(quadruplet_loss(q, p, near, other, 0.3, 0.15)) > float(triplet_loss(q, p, near, 0.3))


def test_augmentation_identity_and_half_turn(rng):
    images = torch.from_numpy(rng.random((3, 1, 31, 31)).astype(np.float32))
    generator = torch.Generator().manual_seed(0)
    same = augment(images, AugmentConfig(max_yaw_deg=0, max_shift_m=0), generator)
    torch.testing.assert_close(same, images, atol=1e-5, rtol=0)
    moved = augment(images, AugmentConfig(max_yaw_deg=180, max_shift_m=2), generator)
    assert moved.shape == images.shape and not torch.allclose(moved, images)


def _toy_sequences(rng: np.random.Generator, size: int = 24, frames: tuple[int, int, int] = (30, 24, 24)) -> tuple[list[PlaceSequence], list[PlaceSequence]]:
    """Two small 'drives' of size x size images whose content changes with position, and a looping one."""

    def drive(name: str, seed: int, n: int, loop: bool) -> PlaceSequence:
        r = np.random.default_rng(seed)
        strip = (r.random((size, size + 2 * n)) > 0.9).astype(np.uint8) * 255
        k = np.r_[np.arange(n // 2), np.arange(n - n // 2)] if loop else np.arange(n)
        poses = np.tile(np.eye(4), (n, 1, 1))
        poses[:, 0, 3] = 2.0 * k
        return PlaceSequence(name, np.stack([strip[:, 2 * i : 2 * i + size] for i in k]), poses, np.arange(n))

    return [drive("a", 1, frames[0], False), drive("b", 2, frames[1], False)], [drive("v", 3, frames[2], True)]


def test_tiny_training_is_deterministic_and_resumes(tmp_path, rng):
    train, val = _toy_sequences(rng)
    mining = MiningConfig(negatives=2, queries_per_epoch=4, pool_size=24)
    cfg = PlaceTrainConfig(epochs=2, batch_tuples=2, clusters=4, kmeans_images=8, eval_rotations=2, val_rotations=1, val_exclude_recent=4,
                           encode_batch=8, device="cpu", mining=mining)
    full, history = train_place(train, val, cfg, tmp_path / "full", progress=lambda m: None)
    assert [h.epoch for h in history] == [1, 2]
    assert all(0 < h.tuples <= 4 and np.isfinite(h.loss) and h.val_recall_at_1 is not None for h in history)
    assert (tmp_path / "full" / "epoch_002.pt").is_file()
    assert full.cfg.rotations == 2  # inference default stored, not the training rotation count

    from dataclasses import replace

    train_place(train, val, replace(cfg, epochs=1), tmp_path / "split", progress=lambda m: None)
    _, history2 = train_place(train, val, cfg, tmp_path / "split", resume=True, progress=lambda m: None)
    assert [h.epoch for h in history2] == [1, 2]
    a = load_checkpoint(tmp_path / "full" / "epoch_002.pt").state_dict()
    b = load_checkpoint(tmp_path / "split" / "epoch_002.pt").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=f"resume diverged at {key}")


def test_frozen_backbone_trains_netvlad_only_from_the_feature_bank(tmp_path, rng):
    train, val = _toy_sequences(rng)
    mining = MiningConfig(negatives=2, queries_per_epoch=6, pool_size=24)
    cfg = PlaceTrainConfig(epochs=2, batch_tuples=2, clusters=4, kmeans_images=8, eval_rotations=2, train_rotations=2, val_exclude_recent=4,
                           encode_batch=8, device="cpu", mining=mining, train_backbone=False, bank_views=3, lr=1e-2)
    model, history = train_place(train, val, cfg, tmp_path / "frozen", progress=lambda m: None)
    assert all(h.tuples > 0 and np.isfinite(h.loss) for h in history)
    start = load_checkpoint(tmp_path / "frozen" / "epoch_001.pt").state_dict()
    seeded = build_seeded_model(BEVPlaceNetConfig(rotations=2, clusters=4), seed=cfg.seed).state_dict()
    for key, value in model.state_dict().items():
        if key.startswith("backbone."):
            torch.testing.assert_close(value, seeded[key], msg=f"{key} moved")
    assert any(not torch.equal(value, start[key]) for key, value in load_checkpoint(tmp_path / "frozen" / "epoch_002.pt").state_dict().items()
               if key.startswith("vlad.")), "NetVLAD did not learn"


def test_fine_tuning_a_v1_checkpoint_trains_its_netvlad_from_its_own_centroids(tmp_path, rng, torch_one_thread):
    """`--init`: the authors' network (here a small seeded one) keeps its backbone and starts from its
    NetVLAD: no k-means re-initialisation, and the assignment bias the authors lack stays zero."""
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "v1.pt", BEVPlaceV1(BEVPlaceV1Config(image_size=64)))
    start = load_checkpoint(tmp_path / "v1.pt").state_dict()
    train, val = _toy_sequences(rng, size=64, frames=(8, 6, 8))
    cfg = PlaceTrainConfig(epochs=2, batch_tuples=2, val_exclude_recent=2, encode_batch=8, device="cpu", train_backbone=False, bank_views=1,
                           lr=1e-2, init=str(tmp_path / "v1.pt"),
                           mining=MiningConfig(pos_radius_m=3, neg_radius_m=5, negatives=2, queries_per_epoch=4, pool_size=12))
    model, history = train_place(train, val, cfg, tmp_path / "ft", progress=lambda m: None)
    assert model.kind == "bevplace_v1" and all(h.tuples > 0 and np.isfinite(h.loss) for h in history)
    tuned = model.state_dict()
    for key in start:
        if key.startswith("encoder."):
            torch.testing.assert_close(tuned[key], start[key], msg=f"{key} moved")
    moved = (tuned["vlad.centroids"] - start["vlad.centroids"]).abs().max()
    steps = sum(-(-h.tuples // cfg.batch_tuples) for h in history)
    assert 0 < moved <= 1.01 * steps * cfg.lr, (moved, steps)  # Adam moves a weight ~lr per step: from the file's centroids, not k-means ones
    assert not torch.equal(tuned["vlad.assign.weight"], start["vlad.assign.weight"])
    assert torch.count_nonzero(tuned["vlad.assign.bias"]) == 0


@pytest.mark.slow
def test_train_place_init_authors_fine_tunes_the_shipped_v1_on_raw_scans(tmp_path, rng, torch_one_thread):
    """The command: the shipped v1 weights, raw scans rasterised with the bevplace_kitti preset, NetVLAD only."""
    from bevplace_ros.bev import BEVConfig, make_bev
    from bevplace_ros.cli import main
    from bevplace_ros.datasets.kitti import read_kitti

    data = _kitti_folder(tmp_path / "seq", rng, frames=10)
    out = tmp_path / "tuned.pt"
    assert main(["train", "place", str(data), "--init", "authors", "--freeze-backbone", "--bank-views", "1", "--epochs", "1",
                 "--queries", "4", "--pool", "10", "--negatives", "1", "--batch", "2", "--pos-radius", "3", "--neg-radius", "5",
                 "--lr", "1e-2", "--work-dir", str(tmp_path / "work"), "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
                 "--device", "cpu"]) == 0
    tuned, shipped = load_checkpoint(out).state_dict(), load_checkpoint(DEFAULT_V1_WEIGHTS).state_dict()
    assert all(torch.equal(tuned[k], shipped[k]) for k in shipped if k.startswith("encoder."))
    assert not torch.equal(tuned["vlad.centroids"], shipped["vlad.centroids"])
    rendered = load_sequence(str(data), BEVConfig.preset("bevplace_kitti"), cache_dir=tmp_path / "cache").images  # cached by the run
    first = next(iter(read_kitti(data))).points
    np.testing.assert_array_equal(rendered[0], np.round(make_bev(first, BEVConfig.preset("bevplace_kitti")) * 255))


def test_feature_bank_view_zero_is_the_networks_own_output(rng):
    from bevplace_ros.training.feature_bank import FeatureBank

    model = build_seeded_model(BEVPlaceNetConfig(rotations=2, clusters=4))
    images = (rng.random((3, 24, 24)) * 255).astype(np.uint8)
    bank = FeatureBank.build(model, images, 2, lambda x: torch.flip(x, (3,)), 2, torch.device("cpu"))
    with torch.no_grad():
        local, desc = model(torch.from_numpy(images.astype(np.float32) / 255.0)[:, None])
    torch.testing.assert_close(bank.local(np.arange(3)), local, atol=2e-3, rtol=2e-3)  # float16 storage
    np.testing.assert_allclose(bank.descriptors(model, torch.device("cpu")), desc.numpy(), atol=2e-3)
    assert not torch.allclose(bank.local(np.arange(3), np.ones(3)), bank.local(np.arange(3)))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="PlaceTrainConfig.loss"):
        PlaceTrainConfig(loss="contrastive")
    with pytest.raises(ValueError, match="AugmentConfig.max_yaw_deg"):
        AugmentConfig(max_yaw_deg=270)


def test_shipped_weights_load_and_a_damaged_copy_fails_clearly(tmp_path):
    model = load_checkpoint(DEFAULT_PLACE_WEIGHTS)
    assert model.descriptor_dim == 8192 and model.cfg.rotations == 8
    assert DEFAULT_PLACE_WEIGHTS.stat().st_size < 20e6
    damaged = tmp_path / "cut.pt"
    damaged.write_bytes(DEFAULT_PLACE_WEIGHTS.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(damaged)
