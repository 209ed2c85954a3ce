"""Place-recognition metrics on hand-checkable cases, and the evaluate/embed commands end to end."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from bevplace_ros.cli import main
from bevplace_ros.evaluation.place_metrics import (
    LoopMatches,
    descriptor_loop_matches,
    descriptor_top_k,
    loop_correct,
    loop_recall_at_1,
    pr_curve,
    revisit_directions,
    split_recall,
    top_percent_k,
)


def _line(n: int, step: float = 1.0) -> np.ndarray:
    return np.column_stack([np.arange(n) * step, np.zeros(n), np.zeros(n)])


def test_split_recall_counts_only_queries_with_a_true_match():
    db = _line(200)
    queries = np.array([[10.0, 1.0, 0.0], [50.0, 0.0, 0.0], [500.0, 0.0, 0.0]])  # the last one has no match
    top = np.zeros((3, top_percent_k(200)), dtype=np.int64)
    top[0] = [100, 11]  # top-1 wrong, top-2 right
    top[1] = [52, 0]  # top-1 within 5 m
    result = split_recall(top, db, queries, radius_m=5.0)
    assert result.queries == 2
    assert result.recall_at_1 == pytest.approx(50.0)
    assert result.recall_at_1pct == pytest.approx(100.0)
    np.testing.assert_array_equal(result.query_rows, [0, 1])


def test_descriptor_search_and_loop_matches_respect_the_exclusion(rng):
    x = rng.normal(size=(30, 16)).astype(np.float32)
    x[25] = x[4] + 0.01  # a revisit of frame 4
    x[12] = x[11] + 0.01  # a recent neighbour: must not be matched with exclusion 5
    assert descriptor_top_k(x[:20], x[25:26], 3)[0, 0] == 4
    matches = descriptor_loop_matches(x, exclude_recent=5, chunk=7)
    assert (matches.match[:6] == -1).all()
    assert matches.match[25] == 4 and matches.distance[25] == pytest.approx(0.04, abs=1e-3)
    assert matches.match[12] != 11 and (matches.match[6:] < np.arange(6, 30) - 5).all()


def test_directions_and_pr_curve_by_hand():
    # out along x for 20 frames, back along the same line for 20: every return frame revisits in reverse
    out = _line(20)
    positions = np.concatenate([out, out[::-1]])
    headings = np.r_[np.zeros(20), np.full(20, np.pi)]
    directions = revisit_directions(positions, headings, exclude_recent=5, radius_m=1.5)
    assert set(directions[:20]) == {""}
    assert (directions[26:] == "reverse").all()
    n = len(positions)
    match = np.full(n, -1)
    dist = np.full(n, np.inf)
    revisit = np.flatnonzero(directions == "reverse")
    match[revisit] = 39 - revisit  # the exact mirror frame: correct
    dist[revisit] = np.linspace(0.1, 0.5, len(revisit))
    match[revisit[-1]] = 10  # the most distant one is wrong
    matches = LoopMatches(match, dist)
    correct = loop_correct(matches, positions, radius_m=1.5)
    assert correct.sum() == len(revisit) - 1
    assert loop_recall_at_1(matches, positions, directions, 1.5) == pytest.approx(100.0 * (len(revisit) - 1) / len(revisit))
    reverse = pr_curve(matches, correct, directions, "reverse")
    k = len(revisit)
    assert reverse.f1_max == pytest.approx(2 * (k - 1) / k / (1 + (k - 1) / k))  # precision 1 at recall (k-1)/k
    assert pr_curve(matches, correct, directions, "same").f1_max is None
    with pytest.raises(ValueError, match="direction"):
        pr_curve(matches, correct, directions, "sideways")


def _bev_folder(root, rng, n: int = 40):
    """A drive out and back along a street of random 'buildings': frame i and 39-i are the same place."""
    (root / "imgs").mkdir(parents=True)
    world = (rng.random((151, 151 + 4 * n)) > 0.97).astype(np.uint8) * 255
    poses = []
    for i in range(n):
        k = i if i < n // 2 else n - 1 - i
        img = world[:, 4 * k : 4 * k + 151]
        cv2.imwrite(str(root / "imgs" / f"{i:06d}.png"), img if i < n // 2 else img[::-1, ::-1].copy())
        yaw = 0.0 if i < n // 2 else np.pi
        poses.append([np.cos(yaw), -np.sin(yaw), 0, 1.6 * k, np.sin(yaw), np.cos(yaw), 0, 0, 0, 0, 1, 0])
    np.savetxt(root / "pose.txt", np.array(poses))
    return root


def test_evaluate_and_embed_commands(tmp_path, rng, capsys):
    data = _bev_folder(tmp_path / "seq", rng)
    out = tmp_path / "eval"
    code = main(["evaluate", "place", str(data), "--methods", "random", "scan_context", "--rotations", "2", "--exclude-recent", "10",
                 "--split", "20:20", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    methods = report["sequences"][str(data)]["methods"]
    assert methods["scan_context"]["built_from"] == "BEV image"
    assert methods["scan_context"]["split_queries"] == 20
    assert methods["scan_context"]["recall_at_1"] > 90.0  # the mirrored images are exact revisits
    assert methods["random"]["f1max_same"] is None and methods["random"]["revisits_reverse"] > 0
    assert len(list(out.glob("pr_*.png"))) == 1
    assert len(list(out.glob("trajectory_*.png"))) == 2

    target = tmp_path / "d.npy"
    assert main(["embed", f"{data}@5:12", "--out", str(target), "--weights", "random", "--rotations", "2", "--batch", "3", "--device", "cpu"]) == 0
    desc = np.load(target)
    assert desc.shape == (7, 8192) and desc.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1.0, atol=1e-4)


def test_commands_fail_clearly_on_bad_input(tmp_path):
    with pytest.raises(SystemExit, match="embed: .*not a rosbag2 folder"):
        main(["embed", str(tmp_path), "--out", str(tmp_path / "x.npy"), "--weights", "random"])
    with pytest.raises(SystemExit, match="checkpoint"):
        main(["embed", str(_bev_folder(tmp_path / "s", np.random.default_rng(1), 4)), "--out", str(tmp_path / "x.npy"), "--weights", str(tmp_path / "none.pt")])
