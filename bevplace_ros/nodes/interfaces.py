"""Message classes and definitions by type name ('pkg/msg/Name'), for replay and recording."""

from __future__ import annotations

import importlib
from pathlib import Path


def message_class(msgtype: str):
    """The rclpy message class of 'pkg/msg/Name'."""
    package, kind, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{package}.{kind}"), name)


def package_share_file(relative: str) -> Path:
    """A file of the package's share folder (msg/, config/, launch/) where installed, else this source tree's."""
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

        installed = Path(get_package_share_directory("bevplace_ros")) / relative
        if installed.exists():
            return installed
    except (ImportError, PackageNotFoundError):
        pass
    return Path(__file__).resolve().parents[2] / relative


def rosbags_typestore():
    """A rosbags typestore that knows the standard ROS 2 messages and ours."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)
    types = {}
    for path in sorted(package_share_file("msg").glob("*.msg")):
        types.update(get_types_from_msg(path.read_text(), f"bevplace_ros/msg/{path.stem}"))
    store.register(types)
    return store
