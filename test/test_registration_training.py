"""Training: overlap labels follow the ground truth, the circle loss ranks matches, cached frozen encodings equal the
registrar's, only attention and heads train, and a run resumes from its state."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bevplace_ros.datasets.kitti import read_kitti_scan
from bevplace_ros.registration.model import RoITrLite
from bevplace_ros.registration.preprocess import PreprocessConfig, prepare_cloud
from bevplace_ros.registration.training import (
    FROZEN_MODULES,
    circle_loss,
    complete,
    cosine_lr,
    curriculum_distance,
    encode_frozen,
    freeze_encoders,
    pair_loss,
    patch_overlap,
    prepare_pair,
    superpoint_subset,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")
from bevplace_ros.se3 import invert, make_transform, random_rotation, transform_points


def test_patch_overlap_of_a_moved_copy_is_its_own_diagonal(shared_data, rng):
    scan = read_kitti_scan(shared_data / "kitti_scans" / "000000.bin")
    arrays = prepare_cloud(scan, PreprocessConfig()).arrays()
    T = make_transform(random_rotation(rng), np.array([3.0, -2.0, 0.5]))
    moved = dict(arrays, fine_points=transform_points(T, arrays["fine_points"]),
                 superpoints=transform_points(T, arrays["superpoints"]))
    overlap = patch_overlap(arrays, moved, T, radius=0.3)
    np.testing.assert_allclose(np.diag(overlap), 1.0)
    far = np.linalg.norm(arrays["superpoints"][:, None] - arrays["superpoints"][None], axis=-1) > 10.0
    assert overlap[far].max() == 0.0
    assert patch_overlap(arrays, moved, invert(T), radius=0.3).trace() < overlap.trace()


def test_circle_loss_prefers_matching_descriptors():
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(32, 16, generator=gen), dim=1)
    pos = torch.eye(32, dtype=torch.bool)
    scale = torch.ones(32, 32)
    aligned = circle_loss(torch.cdist(a, a), pos, ~pos, scale)
    shuffled = circle_loss(torch.cdist(a, a[torch.randperm(32, generator=gen)]), pos, ~pos, scale)
    assert aligned < shuffled


def _kitti_pair(shared_data, rng) -> dict[str, np.ndarray]:
    """A training-format pair: KITTI scan 0 and a moved copy of it, labelled with the known transform."""
    from bevplace_ros.registration.training import TrainConfig

    scan = read_kitti_scan(shared_data / "kitti_scans" / "000000.bin")
    T = make_transform(random_rotation(rng), np.array([2.0, 1.0, 0.0]))
    moved = np.concatenate([transform_points(invert(T), scan[:, :3]), scan[:, 3:]], axis=1)
    return prepare_pair(SimpleNamespace(source=scan, target=moved, T_target_source=invert(T)), TrainConfig())


def test_cached_encodings_reproduce_the_registrar_encoding(shared_data, rng):
    from bevplace_ros.registration.model import cloud_tensors
    from bevplace_ros.registration.preprocess import CLOUD_KEYS

    pair = _kitti_pair(shared_data, rng)
    model = RoITrLite().eval()
    frozen = encode_frozen(model, pair)
    full = model.encode(*cloud_tensors({k: pair[f"src_{k}"] for k in CLOUD_KEYS}, torch.device("cpu")))
    cached = complete(model, frozen[0], np.arange(len(pair["src_superpoints"])))
    for name in ("point_desc", "super_feat", "geo"):
        torch.testing.assert_close(getattr(cached, name), getattr(full, name))
    keep = superpoint_subset(len(pair["src_superpoints"]), 64, rng)
    assert len(keep) == 64 and np.all(np.diff(keep) > 0)
    torch.testing.assert_close(complete(model, frozen[0], keep).geo, full.geo[keep][:, keep])


def test_a_step_trains_only_attention_and_heads_and_the_weights_still_load(shared_data, rng, tmp_path):
    from bevplace_ros.registration.checkpoint import load_model, save_checkpoint
    from bevplace_ros.registration.training import TrainConfig

    cfg = TrainConfig(max_superpoints=128)
    pair = _kitti_pair(shared_data, rng)
    model = RoITrLite()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = freeze_encoders(model)
    opt = torch.optim.AdamW(params, lr=1e-3)
    loss, parts = pair_loss(model, pair, encode_frozen(model, pair), cfg, rng)
    loss.backward()
    opt.step()
    assert parts["coarse"] > 0 and parts["fine"] > 0
    after = model.state_dict()
    changed = {k.split(".")[0] for k in after if not torch.equal(after[k], before[k])}
    assert changed.isdisjoint(FROZEN_MODULES)
    assert {"self_layers", "cross_layers", "coarse_head", "fine_head"} <= changed
    save_checkpoint(tmp_path / "w.pt", model, {})
    loaded, _ = load_model(tmp_path / "w.pt", torch.device("cpu"))
    assert all(torch.equal(loaded.state_dict()[k], after[k]) for k in after)


def test_curriculum_widens_to_every_pair_and_the_schedule_continues_on_resume():
    from bevplace_ros.registration.training import TrainConfig

    cfg = TrainConfig(start_distance=6.0, curriculum_epochs=4, epochs=10)
    reach = [curriculum_distance(cfg, e) for e in range(6)]
    assert reach[0] == 6.0 and reach[:4] == sorted(reach[:4]) and reach[4] == reach[5] == np.inf
    longer = TrainConfig(start_distance=6.0, curriculum_epochs=4, epochs=20)
    assert cosine_lr(cfg, 0.0) == cfg.lr and cosine_lr(cfg, 10.0) < 1e-12 < cosine_lr(longer, 10.0)
    assert cosine_lr(cfg, 3.0) > cosine_lr(cfg, 3.5) > cosine_lr(cfg, 4.0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_training_resumes_from_its_state_and_logs_every_epoch(tmp_path):
    from bevplace_ros.registration.training import TrainConfig, train

    cfg = TrainConfig(train_worlds=(("urban", 1),), pairs_per_world=2, val_worlds=(("urban", 50),), val_pairs=1,
                      epochs=1, curriculum_epochs=1, cache_dir=str(tmp_path / "cache"))
    out, state, log = tmp_path / "w.pt", tmp_path / "s.pt", tmp_path / "log.json"
    first = train(cfg, out, resume=False, log=lambda _: None, state_path=state, log_path=log)
    assert [h["epoch"] for h in first["history"]] == [-1, 0]
    second = train(replace(cfg, epochs=2), out, resume=True, log=lambda _: None, state_path=state, log_path=log)
    assert [h["epoch"] for h in second["history"]] == [-1, 0, 1]
    assert json.loads(log.read_text())["history"] == second["history"]
    assert second["history"][1] == first["history"][1]
