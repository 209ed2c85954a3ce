"""sensor_msgs/PointCloud2 <-> numpy for any object shaped like the message.

rclpy messages, rosbags typestore messages and plain objects all carry the same attributes
(header, height, width, fields, is_bigendian, point_step, row_step, data, is_dense), so one
duck-typed decoder serves the live nodes, the bag readers and the tests. The API mirrors
sensor_msgs_py (not installable here) so it reads familiar. Decoding is a zero-copy
`np.ndarray` view over `data` whenever the layout allows it.
"""

from __future__ import annotations

import operator
import sys
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np
from numpy.lib import recfunctions

# sensor_msgs/PointField datatype constants -> numpy type codes (byte order added later).
DATATYPES: dict[int, str] = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 8: "f8"}
_CODES: dict[tuple[str, int], int] = {(np.dtype(code).kind, np.dtype(code).itemsize): dt for dt, code in DATATYPES.items()}

INT8, UINT8, INT16, UINT16, INT32, UINT32, FLOAT32, FLOAT64 = range(1, 9)


class PointCloud2Error(ValueError):
    """A PointCloud2 whose layout or content cannot be decoded as described."""


class TimeFieldError(PointCloud2Error):
    """A per-point time field whose unit or reference cannot be read: the geometry is still usable."""


class FieldSpec(NamedTuple):
    """One sensor_msgs/PointField, for writers that build their own message classes."""

    name: str
    offset: int
    datatype: int
    count: int = 1


def _as_int(value: Any, what: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise PointCloud2Error(f"{what} must be an integer, got {value!r}") from None


def _field_specs(fields: Iterable[Any]) -> list[FieldSpec]:
    """Validate message fields into FieldSpecs (names unique, known datatypes, sane counts)."""
    specs: list[FieldSpec] = []
    seen: set[str] = set()
    for field in fields:
        name = getattr(field, "name", None)
        if not isinstance(name, str) or not name:
            raise PointCloud2Error(f"field name must be a non-empty string, got {name!r}")
        if name in seen:
            raise PointCloud2Error(f"duplicated field name {name!r}")
        seen.add(name)
        offset = _as_int(getattr(field, "offset", None), f"field {name!r} offset")
        datatype = _as_int(getattr(field, "datatype", None), f"field {name!r} datatype")
        count = _as_int(getattr(field, "count", None), f"field {name!r} count")
        if datatype not in DATATYPES:
            raise PointCloud2Error(f"field {name!r} has unknown datatype {datatype} (expected 1..8)")
        if offset < 0 or count < 1:
            raise PointCloud2Error(f"field {name!r} needs offset >= 0 and count >= 1, got {offset}, {count}")
        specs.append(FieldSpec(name, offset, datatype, count))
    return specs


def dtype_from_fields(fields: Iterable[Any], point_step: int | None = None, *, is_bigendian: bool = False) -> np.dtype:
    """Structured dtype with the message's offsets and itemsize, so it can view `data` in place."""
    specs = _field_specs(fields)
    order = ">" if is_bigendian else "<"
    formats = [np.dtype(order + DATATYPES[s.datatype]) if s.count == 1 else np.dtype((order + DATATYPES[s.datatype], (s.count,))) for s in specs]
    ends = [s.offset + f.itemsize for s, f in zip(specs, formats)]
    itemsize = max(ends, default=0) if point_step is None else _as_int(point_step, "point_step")
    for spec, end in zip(specs, ends):
        if end > itemsize:
            raise PointCloud2Error(f"field {spec.name!r} (offset {spec.offset}, {end - spec.offset} bytes) extends past point_step {itemsize}")
    return np.dtype({"names": [s.name for s in specs], "formats": formats, "offsets": [s.offset for s in specs], "itemsize": itemsize})


def _data_bytes(data: Any) -> np.ndarray:
    """`data` as a flat uint8 array, without copying bytes, bytearray, array.array or uint8 ndarray."""
    if isinstance(data, np.ndarray):
        if data.dtype.itemsize != 1 or data.dtype.kind not in "iu":
            raise PointCloud2Error(f"data must hold bytes (uint8), got an array of {data.dtype}")
        return np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    if not isinstance(data, (list, tuple)):
        try:
            return np.frombuffer(data, dtype=np.uint8)
        except (TypeError, ValueError) as err:
            raise PointCloud2Error(f"data must be a contiguous byte buffer or a list of byte values, got {type(data).__name__}: {err}") from None
    try:
        values = np.asarray(data)
    except ValueError:  # ragged nesting
        values = np.asarray(data, dtype=object)
    if values.size == 0:
        return np.zeros(0, dtype=np.uint8)
    if values.ndim != 1 or values.dtype.kind not in "iu" or values.min() < 0 or values.max() > 255:
        raise PointCloud2Error("data is not a sequence of byte values (integers 0..255)")
    return values.astype(np.uint8)


def _grid(cloud: Any) -> np.ndarray:
    """The cloud as a (height, width) structured array viewing `data` (strided over row padding)."""
    height = _as_int(cloud.height, "height")
    width = _as_int(cloud.width, "width")
    point_step = _as_int(cloud.point_step, "point_step")
    row_step = _as_int(cloud.row_step, "row_step")
    if height < 0 or width < 0 or point_step < 0:
        raise PointCloud2Error(f"height, width and point_step must be >= 0, got {height}, {width}, {point_step}")
    dtype = dtype_from_fields(cloud.fields, point_step, is_bigendian=bool(cloud.is_bigendian))
    if row_step < width * point_step:
        raise PointCloud2Error(f"row_step {row_step} < width {width} x point_step {point_step}")
    raw = _data_bytes(cloud.data)
    if raw.size != row_step * height:
        raise PointCloud2Error(f"data holds {raw.size} bytes, expected row_step {row_step} x height {height} = {row_step * height}")
    if height * width == 0:
        return np.zeros((height, width), dtype=dtype)
    return np.ndarray((height, width), dtype=dtype, buffer=raw, strides=(row_step, point_step))


def _require_xyz(dtype: np.dtype) -> None:
    for axis in "xyz":
        if dtype.names is None or axis not in dtype.names:
            raise PointCloud2Error(f"cloud has no {axis!r} field (fields: {list(dtype.names or ())})")
        if dtype[axis].shape:
            raise PointCloud2Error(f"field {axis!r} must have count 1, got {int(np.prod(dtype[axis].shape))}")


def read_points(
    cloud: Any,
    field_names: Sequence[str] | None = None,
    skip_nans: bool = False,
    uvs: Iterable[tuple[int, int]] | np.ndarray | None = None,
    reshape_organized_cloud: bool = False,
) -> np.ndarray:
    """Structured points (a view into `data` when possible); `uvs` are (column, row) pairs.

    skip_nans drops points whose x, y or z is NaN or inf. reshape_organized_cloud keeps the
    (height, width) grid, which only makes sense without skip_nans and uvs.
    """
    grid = _grid(cloud)
    if reshape_organized_cloud and (skip_nans or uvs is not None):
        raise PointCloud2Error("reshape_organized_cloud cannot be combined with skip_nans or uvs")
    if uvs is not None:
        pixels = np.asarray(list(uvs) if not isinstance(uvs, np.ndarray) else uvs, dtype=np.int64).reshape(-1, 2)
        if pixels.size and (pixels[:, 0].min() < 0 or pixels[:, 0].max() >= grid.shape[1] or pixels[:, 1].min() < 0 or pixels[:, 1].max() >= grid.shape[0]):
            raise PointCloud2Error(f"uvs outside the {grid.shape[1]}x{grid.shape[0]} (width x height) cloud")
        points = grid[pixels[:, 1], pixels[:, 0]]
    elif reshape_organized_cloud and grid.shape[0] > 1:
        points = grid
    else:
        points = grid.reshape(-1)
    if skip_nans:
        _require_xyz(points.dtype)
        points = points[np.isfinite(points["x"]) & np.isfinite(points["y"]) & np.isfinite(points["z"])]
    if field_names is not None:
        missing = [name for name in field_names if name not in (points.dtype.names or ())]
        if missing:
            raise PointCloud2Error(f"cloud has no field(s) {missing} (fields: {list(points.dtype.names or ())})")
        points = points[list(field_names)]
    return points


def read_points_numpy(
    cloud: Any,
    field_names: Sequence[str] | None = None,
    skip_nans: bool = False,
    uvs: Iterable[tuple[int, int]] | np.ndarray | None = None,
    reshape_organized_cloud: bool = False,
) -> np.ndarray:
    """(N, k) native-endian array of the selected fields, cast to their common type."""
    points = read_points(cloud, field_names, skip_nans, uvs, reshape_organized_cloud)
    if not points.dtype.names:
        raise PointCloud2Error("cloud has no fields to read")
    common = np.result_type(*[points.dtype[name].base for name in points.dtype.names]).newbyteorder("=")
    return np.ascontiguousarray(recfunctions.structured_to_unstructured(points, dtype=common))


def xyz_intensity(cloud: Any) -> np.ndarray:
    """(N, 4) float32 x, y, z, intensity of the finite points; intensity is 0 when absent."""
    return _xyzi(read_points(cloud, skip_nans=True))


class Scan(NamedTuple):
    """A decoded LiDAR sweep: finite points and, when the driver gives them, their firing times."""

    points: np.ndarray  # (N, 4) float32 x, y, z, intensity
    offsets: np.ndarray | None  # (N,) seconds from the header stamp to each point's firing; None without a usable time field
    time_problem: str = ""  # why a time field present could not be used (the points still can)


# per-point time fields of common drivers, first match wins: Velodyne `time` (float32 s after the stamp), Ouster `t`
# (uint32 ns after it), Hesai / Robosense / Livox `timestamp` (float64 s or ns, absolute), Livox `offset_time` (uint32 ns)
TIME_FIELDS = ("time", "t", "timestamp", "time_stamp", "offset_time")
MAX_SWEEP_S = 1.0  # a per-point time further than this from the stamp is not the time of one sweep


def decode_scan(cloud: Any, stamp_ns: int) -> Scan:
    """Points and per-point time offsets in seconds, whatever the driver's time field name and unit."""
    points = read_points(cloud, skip_nans=True)
    xyzi = _xyzi(points)
    try:
        return Scan(xyzi, _time_offsets(points, stamp_ns))
    except TimeFieldError as err:
        return Scan(xyzi, None, str(err))


def _xyzi(points: np.ndarray) -> np.ndarray:
    out = np.zeros((points.shape[0], 4), dtype=np.float32)
    for column, name in enumerate(("x", "y", "z")):
        out[:, column] = points[name]
    if "intensity" in points.dtype.names:
        if points.dtype["intensity"].shape:
            raise PointCloud2Error("field 'intensity' must have count 1")
        out[:, 3] = points["intensity"]
    return out


def _time_offsets(points: np.ndarray, stamp_ns: int) -> np.ndarray | None:
    """Integers are nanoseconds, floats seconds (nanoseconds beyond 1e15); values beyond 1e6 s are absolute times."""
    name = next((n for n in TIME_FIELDS if n in points.dtype.names), None)
    if name is None or not len(points):
        return None
    if points.dtype[name].shape:
        raise TimeFieldError(f"time field {name!r} must have count 1")
    raw = points[name].astype(np.float64)
    if not np.all(np.isfinite(raw)):
        raise TimeFieldError(f"time field {name!r} holds NaN or inf")
    nanoseconds = points.dtype[name].kind in "iu" or np.abs(raw).max() > 1e15
    seconds = raw * 1e-9 if nanoseconds else raw
    if np.abs(seconds).max() > 1e6:  # absolute: subtract the stamp in the field's own unit
        seconds = (raw - stamp_ns) * 1e-9 if nanoseconds else raw - stamp_ns * 1e-9
    if np.abs(seconds).max() > MAX_SWEEP_S:
        raise TimeFieldError(f"time field {name!r} puts points up to {np.abs(seconds).max():.3g} s from the header stamp, more than "
                               f"one sweep ({MAX_SWEEP_S} s): its unit or reference is not one this package knows")
    return seconds


def field_specs_from_dtype(dtype: np.dtype) -> list[FieldSpec]:
    """PointField descriptions of a structured dtype, offsets included."""
    dtype = np.dtype(dtype)
    if not dtype.names:
        raise PointCloud2Error(f"need a structured dtype with named fields, got {dtype}")
    specs = []
    for name in dtype.names:
        field_dtype, offset = dtype.fields[name][:2]
        base = field_dtype.base
        datatype = _CODES.get((base.kind, base.itemsize))
        if datatype is None:
            raise PointCloud2Error(f"field {name!r} has dtype {base}, which no PointField datatype represents")
        specs.append(FieldSpec(name, int(offset), datatype, int(np.prod(field_dtype.shape, dtype=int))))
    return specs


def pack_points(points: np.ndarray) -> tuple[list[FieldSpec], bytes, int]:
    """Little-endian PointCloud2 payload (fields, data, point_step) of a structured array."""
    points = np.asarray(points)
    specs = field_specs_from_dtype(points.dtype)
    little = dtype_from_fields(specs, points.dtype.itemsize, is_bigendian=False)
    return specs, points.astype(little, copy=False).tobytes(), little.itemsize


def _structured(points: Any, dtype: np.dtype) -> np.ndarray:
    """`points` (structured array, (N, k) array or sequence of tuples) laid out as `dtype`."""
    array = np.asarray(points)
    if array.dtype.names:
        missing = [name for name in dtype.names if name not in array.dtype.names]
        if missing:
            raise PointCloud2Error(f"points lack field(s) {missing}")
        columns = [array[name] for name in dtype.names]
    elif array.ndim == 2 and array.shape[1] == len(dtype.names):
        columns = list(array.T)
    else:
        raise PointCloud2Error(f"points must be structured or (N, {len(dtype.names)}) for fields {list(dtype.names)}, got shape {array.shape}")
    out = np.zeros(columns[0].shape, dtype=dtype)
    try:
        for name, column in zip(dtype.names, columns):
            out[name] = column
    except (TypeError, ValueError) as err:
        raise PointCloud2Error(f"points are not numeric: {err}") from None
    return out


def create_cloud(header: Any, fields: Sequence[Any], points: Any) -> Any:
    """A sensor_msgs.msg.PointCloud2 (rclpy) of `points` laid out as `fields`; 2-D structured input stays organised."""
    from sensor_msgs.msg import PointCloud2, PointField

    dtype = dtype_from_fields(fields, is_bigendian=sys.byteorder != "little")
    array = _structured(points, dtype)
    height, width = array.shape if array.ndim == 2 else (1, array.shape[0])
    return PointCloud2(
        header=header,
        height=height,
        width=width,
        fields=[PointField(name=f.name, offset=f.offset, datatype=f.datatype, count=f.count) for f in fields],
        is_bigendian=sys.byteorder != "little",
        point_step=dtype.itemsize,
        row_step=dtype.itemsize * width,
        data=array.tobytes(),
        is_dense=False,
    )


def create_cloud_xyz32(header: Any, points: Any) -> Any:
    """A float32 x, y, z sensor_msgs.msg.PointCloud2 (rclpy)."""
    fields = [FieldSpec(name, 4 * index, FLOAT32, 1) for index, name in enumerate("xyz")]
    return create_cloud(header, fields, points)
