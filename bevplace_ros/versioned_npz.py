"""One crash-safe, self-describing file format for everything the package saves.

A .npz (a zip of .npy arrays, no pickles) with a `format` name and `version`, written atomically.
Loading checks both and the expected fields, and turns every way a file can be wrong (missing,
truncated, corrupt, foreign, older) into the caller's error class with a one-line reason.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np

from bevplace_ros.atomic_io import atomic_write


def save_versioned_npz(path: str | Path, format_name: str, version: int, arrays: dict[str, np.ndarray]) -> Path:
    payload = {"format": np.array(format_name), "version": np.array(version), **arrays}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **payload)

    return atomic_write(path, write)


def load_versioned_npz(path: str | Path, format_name: str, version: int | tuple[int, ...], expected: Iterable[str],
                       error: type[Exception], optional: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """All `expected` arrays (and those `optional` ones present) of a file written by save_versioned_npz
    in one of the readable `version`s, or `error` saying what is wrong."""
    versions = (version,) if isinstance(version, int) else tuple(version)
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "format" not in npz.files or str(npz["format"]) != format_name:
                raise error(f"{path}: not a {format_name} file")
            if int(npz["version"]) not in versions:
                raise error(f"{path}: format version {int(npz['version'])}, this code reads version "
                            f"{' or '.join(map(str, versions))}")
            missing = set(expected) - set(npz.files)
            if missing:
                raise error(f"{path}: missing fields {sorted(missing)}")
            return {name: npz[name] for name in (*expected, *(n for n in optional if n in npz.files))}
    except error:
        raise
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except (OSError, ValueError, TypeError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise error(f"{path}: corrupt or truncated file ({type(exc).__name__}: {exc})") from None
