"""PointCloud2 <-> numpy on real rclpy and rosbags messages, for the layouts drivers emit."""

from __future__ import annotations

import array
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from bevplace_ros.pointcloud2 import (
    FLOAT32,
    FLOAT64,
    UINT16,
    FieldSpec,
    PointCloud2Error,
    dtype_from_fields,
    field_specs_from_dtype,
    pack_points,
    read_points,
    read_points_numpy,
    xyz_intensity,
)

CODE = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 8: "f8"}


@dataclass
class Layout:
    """A cloud layout described independently of the module under test."""

    fields: list[FieldSpec]
    point_step: int
    height: int = 1
    row_pad: int = 0
    big_endian: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def encode(self, values: dict[str, np.ndarray]) -> tuple[bytes, int]:
        """Hand-built bytes: every field written at its offset, padding bytes set to 0xAB."""
        n = len(next(iter(values.values())))
        width = n // self.height
        row_step = width * self.point_step + self.row_pad
        buf = bytearray(b"\xab" * (row_step * self.height))
        order = ">" if self.big_endian else "<"
        for index in range(n):
            row, col = divmod(index, width)
            base = row * row_step + col * self.point_step
            for spec in self.fields:
                raw = np.asarray(values[spec.name][index], dtype=order + CODE[spec.datatype]).tobytes()
                buf[base + spec.offset : base + spec.offset + len(raw)] = raw
        return bytes(buf), row_step


def _values(rng: np.random.Generator, n: int, specs: list[FieldSpec]) -> dict[str, np.ndarray]:
    out = {}
    for spec in specs:
        dtype = np.dtype(CODE[spec.datatype])
        if dtype.kind == "f":
            out[spec.name] = rng.uniform(-50, 50, n).astype(dtype)
        else:
            info = np.iinfo(dtype)
            out[spec.name] = rng.integers(info.min, info.max, n, endpoint=True, dtype=dtype)
    return out


LAYOUTS = {
    "xyzi": Layout([FieldSpec("x", 0, FLOAT32), FieldSpec("y", 4, FLOAT32), FieldSpec("z", 8, FLOAT32), FieldSpec("intensity", 12, FLOAT32)], 16),
    "xyz_only": Layout([FieldSpec("x", 0, FLOAT32), FieldSpec("y", 4, FLOAT32), FieldSpec("z", 8, FLOAT32)], 12),
    "reordered_padded": Layout(
        [FieldSpec("intensity", 0, FLOAT32), FieldSpec("ring", 6, UINT16), FieldSpec("z", 8, FLOAT32), FieldSpec("x", 16, FLOAT32), FieldSpec("y", 20, FLOAT32)], 32
    ),
    "float64_xyz": Layout([FieldSpec("x", 0, FLOAT64), FieldSpec("y", 8, FLOAT64), FieldSpec("z", 16, FLOAT64), FieldSpec("intensity", 24, FLOAT32)], 32),
    "big_endian": Layout(
        [FieldSpec("x", 0, FLOAT32), FieldSpec("y", 4, FLOAT32), FieldSpec("z", 8, FLOAT32), FieldSpec("intensity", 12, FLOAT32), FieldSpec("ring", 16, UINT16)],
        20,
        big_endian=True,
    ),
    "organised_row_padding": Layout(
        [FieldSpec("x", 0, FLOAT32), FieldSpec("y", 4, FLOAT32), FieldSpec("z", 8, FLOAT32), FieldSpec("intensity", 16, FLOAT32), FieldSpec("t", 20, 6)],
        24,
        height=4,
        row_pad=12,
    ),
    "all_datatypes": Layout([FieldSpec(f"f{dt}", off, dt) for dt, off in zip(range(1, 9), (0, 1, 2, 4, 8, 12, 16, 24))] + [FieldSpec("x", 32, FLOAT32), FieldSpec("y", 36, FLOAT32), FieldSpec("z", 40, FLOAT32)], 48, big_endian=True),
}


def _rclpy_cloud(layout: Layout, data: bytes, width: int, row_step: int) -> Any:
    from sensor_msgs.msg import PointCloud2, PointField

    return PointCloud2(
        height=layout.height, width=width,
        fields=[PointField(name=s.name, offset=s.offset, datatype=s.datatype, count=s.count) for s in layout.fields],
        is_bigendian=layout.big_endian, point_step=layout.point_step, row_step=row_step, data=data, is_dense=False,
    )


def _rosbags_cloud(layout: Layout, data: bytes, width: int, row_step: int) -> Any:
    """A typestore message after a CDR round trip, i.e. exactly what a bag reader yields."""
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    t = store.types
    msg = t["sensor_msgs/msg/PointCloud2"](
        header=t["std_msgs/msg/Header"](stamp=t["builtin_interfaces/msg/Time"](sec=1, nanosec=2), frame_id="lidar"),
        height=layout.height, width=width,
        fields=[t["sensor_msgs/msg/PointField"](name=s.name, offset=s.offset, datatype=s.datatype, count=s.count) for s in layout.fields],
        is_bigendian=layout.big_endian, point_step=layout.point_step, row_step=row_step,
        data=np.frombuffer(data, dtype=np.uint8), is_dense=False,
    )
    return store.deserialize_cdr(store.serialize_cdr(msg, msg.__msgtype__), msg.__msgtype__)


@pytest.mark.parametrize("maker", [_rclpy_cloud, _rosbags_cloud], ids=["rclpy", "rosbags"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_read_round_trip(name: str, maker, rng: np.random.Generator) -> None:
    layout = LAYOUTS[name]
    values = _values(rng, 24, layout.fields)
    data, row_step = layout.encode(values)
    cloud = maker(layout, data, 24 // layout.height, row_step)
    points = read_points(cloud)
    assert points.shape == (24,)
    for spec in layout.fields:
        np.testing.assert_array_equal(points[spec.name], values[spec.name])
    names = ["x", "y", "z"]
    expected = np.stack([values[n].astype(np.float64) for n in names], axis=1)
    np.testing.assert_array_equal(read_points_numpy(cloud, field_names=names).astype(np.float64), expected)
    xyzi = xyz_intensity(cloud)
    assert xyzi.dtype == np.float32 and xyzi.shape == (24, 4)
    np.testing.assert_allclose(xyzi[:, :3], expected.astype(np.float32))
    intensity = values["intensity"] if "intensity" in values else np.zeros(24, np.float32)
    np.testing.assert_array_equal(xyzi[:, 3], intensity)


def test_organised_reshape_and_uvs(rng: np.random.Generator) -> None:
    layout = LAYOUTS["organised_row_padding"]
    values = _values(rng, 24, layout.fields)
    data, row_step = layout.encode(values)
    cloud = _rclpy_cloud(layout, data, 6, row_step)
    grid = read_points(cloud, reshape_organized_cloud=True)
    assert grid.shape == (4, 6)
    np.testing.assert_array_equal(grid["x"], values["x"].reshape(4, 6))
    picked = read_points(cloud, field_names=["x"], uvs=[(5, 0), (2, 3)])
    np.testing.assert_array_equal(picked["x"], [values["x"][5], values["x"][3 * 6 + 2]])


def test_skip_nans_filters_non_finite_xyz(rng: np.random.Generator) -> None:
    layout = LAYOUTS["xyzi"]
    values = _values(rng, 10, layout.fields)
    values["x"][1] = np.nan
    values["z"][4] = np.inf
    values["intensity"][6] = np.nan  # not a coordinate: kept
    data, row_step = layout.encode(values)
    cloud = _rclpy_cloud(layout, data, 10, row_step)
    assert read_points(cloud).shape == (10,)
    kept = read_points(cloud, skip_nans=True)
    np.testing.assert_array_equal(kept["y"], np.delete(values["y"], [1, 4]))
    assert xyz_intensity(cloud).shape == (8, 4)


def test_data_containers_are_viewed_without_copy(rng: np.random.Generator) -> None:
    layout = LAYOUTS["xyzi"]
    values = _values(rng, 8, layout.fields)
    data, row_step = layout.encode(values)
    for container in (data, bytearray(data), array.array("B", data), np.frombuffer(data, np.uint8).copy(), list(data)):
        cloud = _rclpy_cloud(layout, b"", 8, row_step)
        cloud_like = _Plain(cloud, data=container)
        np.testing.assert_array_equal(read_points(cloud_like)["x"], values["x"])
    backing = np.frombuffer(data, np.uint8).copy()
    assert np.shares_memory(read_points(_Plain(cloud, data=backing)), backing)


class _Plain:
    """A duck-typed cloud: the module must not depend on any message class."""

    def __init__(self, template: Any, **overrides: Any) -> None:
        for name in ("header", "height", "width", "fields", "is_bigendian", "point_step", "row_step", "data", "is_dense"):
            setattr(self, name, overrides.get(name, getattr(template, name)))


def test_pack_points_round_trip_through_rosbags(rng: np.random.Generator) -> None:
    dtype = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("intensity", "<f4"), ("ring", "<u2"), ("time", "<f4")], align=True)
    points = np.zeros(50, dtype=dtype)
    for name in dtype.names:
        points[name] = rng.uniform(0, 100, 50)
    specs, data, step = pack_points(points.astype(dtype.newbyteorder(">")))
    assert step == dtype.itemsize
    assert [(s.name, s.offset, s.datatype) for s in specs] == [("x", 0, 7), ("y", 4, 7), ("z", 8, 7), ("intensity", 12, 7), ("ring", 16, 4), ("time", 20, 7)]
    layout = Layout(specs, step)
    cloud = _rosbags_cloud(layout, data, 50, 50 * step)
    back = read_points(cloud)
    for name in dtype.names:
        np.testing.assert_array_equal(back[name], points[name])
    assert field_specs_from_dtype(dtype_from_fields(specs, step)) == specs


def test_create_cloud_rclpy(rng: np.random.Generator) -> None:
    from std_msgs.msg import Header

    from bevplace_ros.pointcloud2 import create_cloud, create_cloud_xyz32

    xyz = rng.normal(size=(30, 3)).astype(np.float32)
    cloud = create_cloud_xyz32(Header(frame_id="lidar"), xyz)
    assert cloud.header.frame_id == "lidar" and cloud.width == 30 and cloud.point_step == 12
    np.testing.assert_array_equal(read_points_numpy(cloud), xyz)
    fields = [FieldSpec("x", 0, FLOAT64), FieldSpec("y", 8, FLOAT64), FieldSpec("z", 16, FLOAT64), FieldSpec("ring", 24, UINT16)]
    rows = np.column_stack([xyz.astype(np.float64), np.arange(30)])
    cloud = create_cloud(Header(), fields, rows)
    np.testing.assert_array_equal(read_points(cloud)["ring"], np.arange(30))
    with pytest.raises(PointCloud2Error, match="not numeric"):
        create_cloud(Header(), fields[:1], [["a"], ["b"]])


def _bad(**overrides: Any) -> _Plain:
    layout = LAYOUTS["xyzi"]
    data, row_step = layout.encode(_values(np.random.default_rng(1), 4, layout.fields))
    return _Plain(_rclpy_cloud(layout, data, 4, row_step), **overrides)


XYZI = LAYOUTS["xyzi"].fields


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"fields": XYZI[1:]}, "no 'x' field"),
        ({"fields": [XYZI[0], XYZI[1], FieldSpec("intensity", 8, FLOAT32)]}, "no 'z' field"),
        ({"fields": XYZI + [FieldSpec("y", 12, FLOAT32)]}, "duplicated field name 'y'"),
        ({"fields": XYZI[:3] + [FieldSpec("intensity", 12, 9)]}, "unknown datatype 9"),
        ({"fields": XYZI[:3] + [FieldSpec("intensity", 13, FLOAT32)]}, "'intensity'.*extends past point_step 16"),
        ({"data": b"\x00" * 63}, "63 bytes, expected row_step 64 x height 1 = 64"),
        ({"row_step": 60, "data": b"\x00" * 60}, "row_step 60 < width 4 x point_step 16"),
        ({"fields": [FieldSpec("x", 0, FLOAT32, 2), XYZI[1], XYZI[2]]}, "'x' must have count 1"),
        ({"fields": XYZI[:3] + [FieldSpec("intensity", "12", FLOAT32)]}, "offset must be an integer"),
        ({"fields": XYZI[:3] + [FieldSpec("intensity", 12, "float32")]}, "datatype must be an integer"),
        ({"width": 4.0}, "width must be an integer"),
        ({"data": "not bytes"}, "contiguous byte buffer"),
        ({"data": [0, 1, 256]}, "byte values"),
        ({"data": np.zeros(8, np.float64)}, "must hold bytes"),
    ],
)
def test_malformed_clouds_raise(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(PointCloud2Error, match=message):
        xyz_intensity(_bad(**overrides))


def test_unknown_field_selection_and_bad_uvs_raise() -> None:
    with pytest.raises(PointCloud2Error, match="no field"):
        read_points(_bad(), field_names=["x", "ring"])
    with pytest.raises(PointCloud2Error, match="uvs outside"):
        read_points(_bad(), uvs=[(4, 0)])
    with pytest.raises(PointCloud2Error, match="cannot be combined"):
        read_points(_bad(), skip_nans=True, reshape_organized_cloud=True)
    with pytest.raises(PointCloud2Error, match="no PointField datatype"):
        pack_points(np.zeros(3, dtype=[("x", "<f2")]))
