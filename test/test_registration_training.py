"""Training labels and losses: overlap labels follow the ground truth, the circle loss ranks matches."""

from __future__ import annotations

import numpy as np
import torch

from bevplace_ros.datasets.kitti import read_kitti_scan
from bevplace_ros.registration.preprocess import PreprocessConfig, prepare_cloud
from bevplace_ros.registration.training import circle_loss, patch_overlap
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
