"""`bevplace-ros retrieve`: the whole place pipeline offline, on published KITTI images and on a
BEV folder this test writes itself."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from bevplace_ros.bev import make_bev
from bevplace_ros.cli import main
from bevplace_ros.models.checkpoint import EQUIVARIANT
from bevplace_ros.se3 import invert, load_kitti_poses, transform_points, xyyaw_to_matrix

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_retrieve_finds_the_revisited_places_of_kitti_06(shared_data, tmp_path):
    """Queries 840-876 drive again past database frames ~7-51 (the published split's revisit)."""
    seq = shared_data / "kitti_bev" / "06"
    out = tmp_path / "matches.npy"
    assert main(["retrieve", str(seq), "--db", "0:60", "--queries", "840:880:4", "--out", str(out), "--device", "cpu"]) == 0
    matches = np.load(out)
    positions = load_kitti_poses(str(seq / "pose.txt"))[:, :3, 3]
    assert matches.shape == (10,) and matches.dtype == np.int64 and ((matches >= 0) & (matches < 60)).all()
    errors = np.linalg.norm(positions[matches] - positions[np.arange(840, 880, 4)], axis=1)
    assert (errors <= 5.0).mean() >= 0.9, errors


def _scene(rng: np.random.Generator) -> np.ndarray:
    """A street-like cloud: random walls and poles, 2 m tall, within 25 m of the sensor."""
    walls = []
    for _ in range(12):
        a, b = rng.uniform(-25, 25, 2), rng.uniform(-25, 25, 2)
        t = rng.uniform(0, 1, (400, 1))
        walls.append(np.hstack([a + t * (b - a), rng.uniform(-1.0, 1.0, (400, 1))]))
    poles = np.repeat(rng.uniform(-25, 25, (40, 2)), 30, axis=0)
    walls.append(np.hstack([poles, rng.uniform(-1.0, 1.0, (len(poles), 1))]))
    return np.vstack(walls).astype(np.float32)


def _write_folder(root, images: list[np.ndarray]) -> None:
    (root / "imgs").mkdir(parents=True)
    for i, image in enumerate(images):
        cv2.imwrite(str(root / "imgs" / f"{i:06d}.png"), np.round(image * 255).astype(np.uint8))
    (root / "pose.txt").write_text("".join("1 0 0 0 0 1 0 0 0 0 1 0\n" for _ in images))


def test_retrieve_on_a_folder_it_makes_picks_moved_places_and_rejects_an_unseen_one(tmp_path, rng):
    """Database: 4 places; queries: the same places seen from a moved, turned sensor, then a fifth
    place never mapped. Untrained network: the geometric re-ranking has to do the work."""
    scenes = [_scene(rng) for _ in range(5)]
    moves = [xyyaw_to_matrix(1.5, -1.0, np.radians(yaw)) for yaw in (20.0, 95.0, -60.0, 170.0)]
    queries = [transform_points(invert(T), s) for T, s in zip(moves, scenes)] + [scenes[4]]
    _write_folder(tmp_path / "bev", [make_bev(s) for s in scenes[:4]] + [make_bev(q) for q in queries])
    out = tmp_path / "matches.npy"
    argv = ["retrieve", str(tmp_path / "bev"), "--db", "0:4", "--queries", "4:9", "--out", str(out), "--model", EQUIVARIANT, "--weights", "random", "--device", "cpu"]
    assert main([*argv, "--min-inliers", "15"]) == 0
    np.testing.assert_array_equal(np.load(out), [0, 1, 2, 3, -1])
    assert main([*argv, "--min-inliers", "0", "--rerank-k", "0"]) == 0
    assert (np.load(out) >= 0).all()  # descriptor order, no rejection: the unseen place gets some answer


def test_retrieve_refuses_bad_ranges(tmp_path, shared_data):
    with pytest.raises(SystemExit, match="END"):
        main(["retrieve", str(shared_data / "kitti_bev" / "06"), "--db", "60:0", "--queries", "840:880", "--out", str(tmp_path / "m.npy")])
