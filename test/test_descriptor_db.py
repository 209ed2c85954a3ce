"""Descriptor database with real faiss: exclusion windows, exact/HNSW switch, size bound, files."""

from __future__ import annotations

import numpy as np
import pytest

from bevplace_ros.descriptor_db import DatabaseConfig, DatabaseError, DescriptorDatabase, Match

DIM = 32


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _filled(rng: np.random.Generator, n: int = 50, **cfg) -> tuple[DescriptorDatabase, np.ndarray]:
    db = DescriptorDatabase(DatabaseConfig(dim=DIM, **cfg))
    desc = _unit(rng, n)
    for i, d in enumerate(desc):
        db.add(keyframe_id=1000 + i, stamp=10.0 + i, descriptor=d)
    return db, desc


def test_exact_query_returns_the_true_nearest(rng):
    db, desc = _filled(rng)
    q = desc[7] + 0.05 * _unit(rng, 1)[0]
    (best, second) = db.query(q, stamp=0.0, k=2)
    brute = np.argsort(np.linalg.norm(desc - q / np.linalg.norm(q), axis=1))[:2]
    assert [best.keyframe_id, second.keyframe_id] == [1000 + brute[0], 1000 + brute[1]]
    assert best.stamp == 17.0 and best.distance < second.distance
    assert best.distance == pytest.approx(np.linalg.norm(desc[7] - q / np.linalg.norm(q)), abs=1e-4)


def test_exclusion_windows_are_honoured(rng):
    db, desc = _filled(rng)
    # the newest 10 keyframes (ids 1040..1049) are never returned, even for their own descriptor
    hits = db.query(desc[45], stamp=59.0, k=50, exclude_recent=10)
    assert len(hits) == 40 and all(m.keyframe_id < 1040 for m in hits)
    # within 5 s of stamp 30 (keyframes with stamps 25.5 < t < 34.5 -> ids 1016..1024) are skipped
    hits = db.query(desc[20], stamp=30.0, k=50, exclude_seconds=4.5)
    assert {m.keyframe_id for m in hits} == set(range(1000, 1050)) - set(range(1016, 1025))
    assert db.query(desc[0], stamp=0.0, k=3, exclude_recent=50) == []


def test_switches_to_hnsw_above_threshold_and_keeps_recall(rng):
    db, desc = _filled(rng, n=300, exact_max_size=100)
    assert db.approximate and len(db) == 300
    found = [db.query(d, stamp=-1e6, k=1)[0].keyframe_id for d in desc[::10]]
    assert found == list(range(1000, 1300, 10))


def test_size_bound_decimates_the_oldest_half(rng):
    db, _ = _filled(rng, n=100, max_size=64)
    ids = db.ids
    assert len(db) < 64
    assert ids[0] == 1000 and ids[-1] == 1099  # first and newest keyframes survive
    assert np.all(np.diff(ids) > 0)  # insertion order kept, so exclude_recent still counts right
    newest = set(range(1000 + 100 - 20, 1100))
    assert newest <= set(ids.tolist())


@pytest.mark.parametrize("exact_max_size", [1000, 10])
def test_save_load_round_trips_exactly(rng, tmp_path, exact_max_size):
    db, desc = _filled(rng, exact_max_size=exact_max_size)
    queries = _unit(rng, 10)
    before = [db.query(q, stamp=35.0, k=5, exclude_recent=3, exclude_seconds=2.0) for q in queries]
    db.save(tmp_path / "map.db")
    loaded = DescriptorDatabase.load(tmp_path / "map.db", expected_dim=DIM)
    np.testing.assert_array_equal(loaded.ids, db.ids)
    np.testing.assert_array_equal(loaded.stamps, db.stamps)
    assert loaded.approximate == db.approximate and loaded.cfg == db.cfg
    assert [loaded.query(q, stamp=35.0, k=5, exclude_recent=3, exclude_seconds=2.0) for q in queries] == before
    loaded.add(5000, 100.0, desc[0])  # still a working database
    assert loaded.query(desc[0], stamp=0.0, k=2)[1] == Match(1000, 10.0, pytest.approx(0.0, abs=1e-3))


def test_bad_files_raise_database_error(rng, tmp_path):
    db, _ = _filled(rng)
    good = db.save(tmp_path / "good.db")
    blob = good.read_bytes()
    cases = {
        "missing.db": None,
        "truncated.db": blob[: len(blob) // 2],
        "corrupt.db": blob[:-100] + bytes(b ^ 0xFF for b in blob[-100:]),
        "foreign.db": b"PK\x03\x04 this is a zip, not a database" * 10,
        "empty.db": b"",
    }
    messages = {"missing.db": "not found", "truncated.db": "truncated", "corrupt.db": "checksum", "foreign.db": "bad magic", "empty.db": "too short"}
    for name, data in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(DatabaseError, match=messages[name]):
            DescriptorDatabase.load(tmp_path / name)
    with pytest.raises(DatabaseError, match="expected 64-d"):
        DescriptorDatabase.load(good, expected_dim=64)


def test_bad_descriptors_and_arguments_raise_value_errors(rng):
    db, _ = _filled(rng, n=5)
    with pytest.raises(ValueError, match="32 values"):
        db.add(1, 0.0, np.ones(31, dtype=np.float32))
    with pytest.raises(ValueError, match="non-zero"):
        db.add(1, 0.0, np.zeros(DIM, dtype=np.float32))
    with pytest.raises(ValueError, match="k >= 1"):
        db.query(np.ones(DIM), stamp=0.0, k=0)
    with pytest.raises(ValueError, match="max_size"):
        DatabaseConfig(max_size=1)
