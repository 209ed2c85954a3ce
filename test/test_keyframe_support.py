"""Keyframe selection, odometry lookup and the bounded keyframe store."""

from __future__ import annotations

import numpy as np
import pytest

from bevplace_ros.keyframe_selector import KeyframeSelector, KeyframeSelectorConfig
from bevplace_ros.keyframe_store import KeyframeStore, KeyframeStoreConfig, KeyframeStoreError
from bevplace_ros.odometry_buffer import OdometryBuffer, OdometryLookupError
from bevplace_ros.se3 import xyyaw_to_matrix


def test_selector_takes_keyframes_by_distance_rotation_and_time():
    selector = KeyframeSelector(KeyframeSelectorConfig(min_distance=1.0, min_rotation_deg=10.0, max_interval=5.0))
    assert selector.accept(0.0, xyyaw_to_matrix(0, 0, 0))
    assert not selector.accept(0.1, xyyaw_to_matrix(0.5, 0, 0))
    assert selector.accept(0.2, xyyaw_to_matrix(1.01, 0, 0))
    assert not selector.accept(0.3, xyyaw_to_matrix(1.01, 0, np.radians(9)))
    assert selector.accept(0.4, xyyaw_to_matrix(1.01, 0, np.radians(11)))
    assert selector.accept(5.5, xyyaw_to_matrix(1.01, 0, np.radians(11)))
    assert selector.travelled == pytest.approx(1.01)


def test_selector_rejects_negative_thresholds():
    with pytest.raises(ValueError, match="min_distance"):
        KeyframeSelectorConfig(min_distance=-1.0)


def test_odometry_interpolates_between_neighbours_and_refuses_gaps():
    buffer = OdometryBuffer(max_gap=0.2)
    buffer.add(0.0, xyyaw_to_matrix(0, 0, 0))
    buffer.add(0.1, xyyaw_to_matrix(1, 0, np.radians(10)))
    T = buffer.lookup(0.05)
    np.testing.assert_allclose(T[:3, 3], [0.5, 0, 0], atol=1e-12)
    assert np.degrees(np.arctan2(T[1, 0], T[0, 0])) == pytest.approx(5.0)
    np.testing.assert_allclose(buffer.lookup(0.25), xyyaw_to_matrix(1, 0, np.radians(10)))
    with pytest.raises(OdometryLookupError, match="no odometry within"):
        buffer.lookup(0.5)
    with pytest.raises(ValueError, match="not after"):
        buffer.add(0.1, np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        buffer.add(0.2, np.full((4, 4), np.nan))


def test_store_spills_to_disk_and_saves_everything(tmp_path):
    store = KeyframeStore(KeyframeStoreConfig(max_in_memory=3, spill_dir=str(tmp_path / "spill")))
    for key in range(10):
        store.put(key, np.full((key + 1, 3), key, dtype=np.float32))
    assert store.in_memory == 3 and len(store) == 10 and store.dropped == 0
    np.testing.assert_array_equal(store.get(0), np.zeros((1, 3), np.float32))
    store.save(tmp_path / "clouds.npz")
    loaded = KeyframeStore(KeyframeStoreConfig(max_in_memory=100))
    assert loaded.load(tmp_path / "clouds.npz") == 10
    for key in range(10):
        np.testing.assert_array_equal(loaded.get(key), store.get(key))
    store.close()
    assert not (tmp_path / "spill").exists() or not any((tmp_path / "spill").iterdir())


def test_store_without_spill_drops_oldest():
    store = KeyframeStore(KeyframeStoreConfig(max_in_memory=2))
    for key in range(5):
        store.put(key, np.zeros((1, 3), np.float32))
    assert store.keys() == [3, 4] and store.dropped == 3 and store.get(0) is None


@pytest.mark.parametrize("content", [b"", b"not a zip", b"PK\x03\x04truncated"])
def test_store_load_refuses_corrupt_files_and_keeps_entries(tmp_path, content):
    store = KeyframeStore(KeyframeStoreConfig())
    store.put(7, np.ones((2, 3), np.float32))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(content)
    with pytest.raises(KeyframeStoreError, match="bad.npz"):
        store.load(bad)
    assert store.keys() == [7]
