"""Keyframe descriptor database: faiss retrieval of loop candidates outside a recency window.

Vectors are unit-norm float32 and searched by inner product (equivalent to L2 on the sphere).
Exact search (IndexFlatIP) is used up to `exact_max_size` keyframes; beyond, the index is
rebuilt once as HNSW, whose query cost grows ~log(N) instead of N. The 5000 threshold comes from
`bevplace-ros benchmark place` (shared 2-core CPU, 1 thread, medians): exact beats HNSW at 1k
(0.16 vs 0.27 ms at 256-d), loses at 10k (3.2 vs 1.6 ms at 256-d; 76 vs 18 ms at 8192-d), and
HNSW recall@1 against exact was 1.000 at 1k and 10k (0.990 at 100k).

Size bound (the robot may run for hours): when `max_size` is reached, every second keyframe of
the oldest half is dropped in one rebuild. The whole trajectory stays covered (old places at
half density, where a revisit still finds a neighbour a few metres away), and batching the
removal amortises the rebuild to a constant cost per added keyframe.

Sessions (one per run of the robot, see pose_graph.py): the recency exclusions only apply among
keyframes of the querying keyframe's own session. A new session's keyframe queries the whole of
every earlier session, whatever the stamps (another day's clock) and however recently it was added.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bevplace_ros.atomic_io import atomic_write

MAGIC = b"BEVPLDB\x00"
FORMAT_VERSION = 2  # 2: a session per keyframe; version 1 files (one session) still load
_HEADER = struct.Struct("<8sII")  # magic, format version, json length


class DatabaseError(RuntimeError):
    """A database file is missing, corrupt, truncated, foreign or does not fit this database."""


class Match(NamedTuple):
    keyframe_id: int
    stamp: float
    distance: float  # L2 distance between unit descriptors, in [0, 2]
    session: int = 0


@dataclass(frozen=True)
class DatabaseConfig:
    dim: int = 8192
    exact_max_size: int = 5_000  # above this, HNSW (see module docstring)
    hnsw_m: int = 32
    hnsw_ef_construction: int = 40
    hnsw_ef_search: int = 128
    max_size: int = 200_000  # then decimate the oldest half (see module docstring)

    def __post_init__(self) -> None:
        for name in ("dim", "exact_max_size", "hnsw_m", "hnsw_ef_construction", "hnsw_ef_search"):
            if getattr(self, name) < 1:
                raise ValueError(f"DatabaseConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_size < 4:
            raise ValueError(f"DatabaseConfig.max_size must be >= 4, got {self.max_size}")


class DescriptorDatabase:
    def __init__(self, cfg: DatabaseConfig = DatabaseConfig()) -> None:
        self.cfg = cfg
        self._ids = np.zeros(0, dtype=np.int64)
        self._stamps = np.zeros(0, dtype=np.float64)
        self._sessions = np.zeros(0, dtype=np.int64)
        self._size = 0  # valid prefix of the three growable arrays above
        self._index = self._new_index(approximate=False)

    def __len__(self) -> int:
        return self._size

    @property
    def approximate(self) -> bool:
        return self._is_hnsw(self._index)

    @property
    def ids(self) -> np.ndarray:
        return self._ids[: self._size].copy()

    @property
    def stamps(self) -> np.ndarray:
        return self._stamps[: self._size].copy()

    @property
    def sessions(self) -> np.ndarray:
        return self._sessions[: self._size].copy()

    def next_session(self) -> int:
        """A session id no stored keyframe has."""
        return int(self._sessions[: self._size].max()) + 1 if self._size else 0

    def stored_bytes(self) -> int:
        """Bytes the map occupies (vectors, HNSW links, ids, stamps): what each keyframe costs."""
        import faiss

        return int(faiss.serialize_index(self._index).size) + 24 * self._size

    @staticmethod
    def _is_hnsw(index) -> bool:
        import faiss

        return isinstance(index, faiss.IndexHNSWFlat)

    def _new_index(self, approximate: bool):
        import faiss

        if not approximate:
            return faiss.IndexFlatIP(self.cfg.dim)
        index = faiss.IndexHNSWFlat(self.cfg.dim, self.cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.cfg.hnsw_ef_construction
        return index

    def _as_unit_rows(self, descriptors: np.ndarray) -> np.ndarray:
        x = np.asarray(descriptors, dtype=np.float32)
        x = x.reshape(1, -1) if x.ndim == 1 else x
        if x.ndim != 2 or x.shape[1] != self.cfg.dim:
            raise ValueError(f"descriptor must have {self.cfg.dim} values (database dim), got shape {np.shape(descriptors)}")
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        if not np.all(np.isfinite(norms)) or np.any(norms == 0):
            raise ValueError("descriptor must be finite and non-zero")
        return np.ascontiguousarray(x / norms)

    def add(self, keyframe_id: int, stamp: float, descriptor: np.ndarray, session: int = 0) -> None:
        self.add_batch(np.array([keyframe_id]), np.array([stamp]), descriptor, session)

    def add_batch(self, keyframe_ids: np.ndarray, stamps: np.ndarray, descriptors: np.ndarray, session: int = 0) -> None:
        """Append keyframes of one session in insertion order (the order `exclude_recent` counts in)."""
        x = self._as_unit_rows(descriptors)
        ids = np.asarray(keyframe_ids, dtype=np.int64).ravel()
        st = np.asarray(stamps, dtype=np.float64).ravel()
        if not len(ids) == len(st) == len(x):
            raise ValueError(f"got {len(ids)} ids, {len(st)} stamps and {len(x)} descriptors; they must match")
        if not np.all(np.isfinite(st)):
            raise ValueError("stamps must be finite")
        self._append_meta(ids, st, np.full(len(ids), session, dtype=np.int64))
        self._index.add(x)
        if not self.approximate and self._size > self.cfg.exact_max_size:
            self._rebuild(np.ones(self._size, dtype=bool))
        if self._size >= self.cfg.max_size:
            self._decimate_oldest_half()

    def _append_meta(self, ids: np.ndarray, stamps: np.ndarray, sessions: np.ndarray) -> None:
        need = self._size + len(ids)
        if need > len(self._ids):  # geometric growth keeps appends amortised O(1)
            cap = max(need, 2 * len(self._ids), 1024)
            self._ids = np.resize(self._ids, cap)
            self._stamps = np.resize(self._stamps, cap)
            self._sessions = np.resize(self._sessions, cap)
        self._ids[self._size : need] = ids
        self._stamps[self._size : need] = stamps
        self._sessions[self._size : need] = sessions
        self._size = need

    def _rebuild(self, keep: np.ndarray) -> None:
        """New index over the kept rows; HNSW once the kept count exceeds the exact limit."""
        vectors = self._index.reconstruct_n(0, self._size)[keep]
        ids, stamps, sessions = (a[: self._size][keep] for a in (self._ids, self._stamps, self._sessions))
        self._index = self._new_index(approximate=len(vectors) > self.cfg.exact_max_size)
        self._index.add(vectors)
        self._size = 0
        self._append_meta(ids, stamps, sessions)

    def _decimate_oldest_half(self) -> None:
        keep = np.ones(self._size, dtype=bool)
        keep[1 : self._size // 2 : 2] = False
        self._rebuild(keep)

    def query(self, descriptor: np.ndarray, stamp: float, k: int = 1, exclude_recent: int = 0, exclude_seconds: float = 0.0,
              session: int = 0) -> list[Match]:
        """Up to k nearest keyframes, skipping, among those of `session`, the newest `exclude_recent`
        and any within `exclude_seconds` of `stamp` (the robot's own recent past, not loops)."""
        if k < 1 or exclude_recent < 0 or exclude_seconds < 0:
            raise ValueError(f"need k >= 1, exclude_recent >= 0, exclude_seconds >= 0; got {k}, {exclude_recent}, {exclude_seconds}")
        import faiss

        x = self._as_unit_rows(descriptor)
        n = self._size
        own = self._sessions[:n] == session
        recent = np.zeros(n, dtype=bool)
        if exclude_recent:
            recent[np.flatnonzero(own)[-exclude_recent:]] = True
        allowed = ~own | ((np.abs(self._stamps[:n] - stamp) >= exclude_seconds) & ~recent)
        if not allowed.any():
            return []
        selector = faiss.IDSelectorBitmap(np.packbits(allowed, bitorder="little"))
        if self.approximate:
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=max(self.cfg.hnsw_ef_search, k))
        else:
            params = faiss.SearchParameters(sel=selector)
        sims, rows = self._index.search(x, min(k, int(allowed.sum())), params=params)
        found = rows[0] >= 0
        dist = np.sqrt(np.maximum(2.0 - 2.0 * sims[0][found], 0.0))
        return [Match(int(self._ids[r]), float(self._stamps[r]), float(d), int(self._sessions[r])) for r, d in zip(rows[0][found], dist)]

    def to_bytes(self) -> bytes:
        """Header (magic, version, JSON with config/count/checksum) + payload."""
        import faiss

        index_bytes = faiss.serialize_index(self._index).tobytes()
        payload = b"".join(a[: self._size].tobytes() for a in (self._ids, self._stamps, self._sessions)) + index_bytes
        meta = {"config": asdict(self.cfg), "count": self._size, "index_bytes": len(index_bytes), "crc32": zlib.crc32(payload)}
        meta_bytes = json.dumps(meta, sort_keys=True).encode()
        return _HEADER.pack(MAGIC, FORMAT_VERSION, len(meta_bytes)) + meta_bytes + payload

    def save(self, path: str | Path) -> Path:
        """One atomic file holding to_bytes()."""
        blob = self.to_bytes()
        return atomic_write(path, lambda tmp: tmp.write_bytes(blob))

    @classmethod
    def load(cls, path: str | Path, expected_dim: int | None = None) -> "DescriptorDatabase":
        """Inverse of save; any inconsistency raises DatabaseError naming the file and the fault."""
        path = Path(path)
        if not path.is_file():
            raise DatabaseError(f"descriptor database not found: {path}")
        return cls.from_bytes(path.read_bytes(), str(path), expected_dim)

    @classmethod
    def from_bytes(cls, blob: bytes, origin: str, expected_dim: int | None = None) -> "DescriptorDatabase":
        """Inverse of to_bytes; `origin` names the source in error messages."""
        import faiss

        meta, payload, version = _split(blob, origin)
        try:
            cfg = DatabaseConfig(**meta["config"])
            count, n_index = int(meta["count"]), int(meta["index_bytes"])
        except (KeyError, TypeError, ValueError) as err:
            raise DatabaseError(f"{origin}: header lacks or garbles a field: {err}") from err
        if expected_dim is not None and cfg.dim != expected_dim:
            raise DatabaseError(f"{origin}: stores {cfg.dim}-d descriptors, expected {expected_dim}-d (other model?)")
        row = 16 if version == 1 else 24  # id, stamp (, session)
        if len(payload) != row * count + n_index:
            raise DatabaseError(f"{origin}: payload is {len(payload)} bytes, header promises {row * count + n_index} (truncated?)")
        if zlib.crc32(payload) != meta.get("crc32"):
            raise DatabaseError(f"{origin}: checksum mismatch (file corrupt)")
        try:
            index = faiss.deserialize_index(np.frombuffer(payload[row * count :], dtype=np.uint8))
        except RuntimeError as err:
            raise DatabaseError(f"{origin}: faiss index unreadable: {err}") from err
        if index.d != cfg.dim or index.ntotal != count:
            raise DatabaseError(f"{origin}: index holds {index.ntotal} x {index.d}-d, header says {count} x {cfg.dim}-d")
        db = cls(cfg)
        db._index = index
        sessions = np.frombuffer(payload[16 * count : 24 * count], dtype=np.int64) if version > 1 else np.zeros(count, dtype=np.int64)
        db._append_meta(np.frombuffer(payload[: 8 * count], dtype=np.int64), np.frombuffer(payload[8 * count : 16 * count], dtype=np.float64), sessions)
        return db


def _split(blob: bytes, path: str) -> tuple[dict, bytes, int]:
    """Header checks: magic (foreign file), version, JSON length (truncation)."""
    if len(blob) < _HEADER.size:
        raise DatabaseError(f"{path}: {len(blob)} bytes, too short for a database header (truncated?)")
    magic, version, n_meta = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise DatabaseError(f"{path}: not a bevplace_ros descriptor database (bad magic {magic!r})")
    if version not in (1, FORMAT_VERSION):
        raise DatabaseError(f"{path}: database format version {version}, this code reads 1 or {FORMAT_VERSION}")
    end = _HEADER.size + n_meta
    if len(blob) < end:
        raise DatabaseError(f"{path}: header truncated")
    try:
        meta = json.loads(blob[_HEADER.size : end])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatabaseError(f"{path}: header is not valid JSON (corrupt): {err}") from err
    if not isinstance(meta, dict):
        raise DatabaseError(f"{path}: header is not a JSON object (corrupt)")
    return meta, blob[end:], version
