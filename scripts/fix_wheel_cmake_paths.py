"""Point the ROS wheels' CMake exports at this interpreter's include dirs.

The Kilted wheels were built in a manylinux container and their exported targets name
/opt/python/cp311-cp311/... include directories that do not exist here; CMake then refuses to
configure any package that generates Python interfaces. Rewriting them to this interpreter's
real Python and numpy include dirs is idempotent and touches only files inside the venv.
"""

from __future__ import annotations

import re
import sys
import sysconfig
from pathlib import Path

import numpy

FOREIGN = re.compile(r"/opt/python/cp3\d+-cp3\d+(?:/lib/python3\.\d+/site-packages/numpy/_core/include|/include/python3\.\d+)")


def _replacement(match: re.Match[str]) -> str:
    return numpy.get_include() if match.group(0).endswith("numpy/_core/include") else sysconfig.get_paths()["include"]


def main(prefix: str) -> int:
    changed = 0
    for path in Path(prefix, "share").glob("*/cmake/*.cmake"):
        text = path.read_text()
        fixed = FOREIGN.sub(_replacement, text)
        if fixed != text:
            path.write_text(fixed)
            changed += 1
    print(f"[setup] rewrote foreign include dirs in {changed} CMake export file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else sys.prefix))
