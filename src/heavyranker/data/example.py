"""tf.Example wire format: a batch decoder written for speed, and an encoder for synthetic data and tests.

Hand-written because TensorFlow is not a dependency and protobuf's Python objects cost one Python object
per value (6,000 floats per seed record). Decoding never makes one Python object per value: the usual
layout (every wanted feature one packed run of the schema's length) is decoded by the compiled
`_wire.decode` (_wire.c) straight from the wire bytes into the output arrays, at about 4 us per seed
record. Every record it declines (unpacked values, other field orders, a bytes_list, damage), and every
record when it is not built, goes to the general path: `_parse` walks the record's fields in Python and
notes where each wanted feature's values lie, then numpy converts the values of all those records at once.
Measured on seed records, a Python walk alone costs about 20 us and the numpy conversion about 10 us.

Wire format (field number: type):
  Example  {1: Features}
  Features {1: repeated map entry {1: key string, 2: Feature}}
  Feature  oneof {1: BytesList {1: repeated bytes}, 2: FloatList {1: repeated float},
                  3: Int64List {1: repeated int64}}
Repeated floats and int64s are "packed" (one length-delimited run) or unpacked (one tagged field per value);
both are valid protobuf, so both are read. int64 is a plain varint: negatives take ten bytes (two's
complement), no zigzag.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from ..errors import DataError, UserError
from ..schema import FeatureSpec

log = logging.getLogger(__name__)

try:
    from . import _wire  # built from _wire.c by `pip install`
except ImportError:  # no compiler at install time: every record takes the general parser
    _wire = None
    log.warning(
        "heavyranker.data._wire is not built (reinstall with gcc available): tf.Example decoding "
        "runs in pure Python, several times slower"
    )

KINDS = ("bytes_list", "float_list", "int64_list")  # Feature's oneof, field numbers 1, 2, 3
_DTYPES = {"bytes_list": object, "float_list": np.float32, "int64_list": np.int64}
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5  # protobuf wire types
_VARINT_LIMITS = np.array([1 << (7 * k) for k in range(1, 10)], dtype=np.uint64)  # 2**7 ... 2**63
_Spans = list[tuple[int, int]]
_Values = _Spans | list[bytes]  # where a feature's numbers lie in a record, or a bytes_list's values


class _Malformed(ValueError):
    """Not a well-formed tf.Example; decode_batch adds the file and the record."""


class ExampleDecoder:
    """Decodes the `wanted` schema features of serialized tf.Examples into [N, length] numpy arrays.
    Not thread-safe (missing_counts): one decoder per thread or process."""

    def __init__(self, specs: Mapping[str, FeatureSpec], wanted: Iterable[str]):
        names = list(dict.fromkeys(wanted))
        unknown = [name for name in names if name not in specs]
        if unknown:
            raise UserError(
                f"feature(s) {', '.join(unknown)} not in the schema, whose features are {', '.join(specs)}"
            )
        self.specs = [specs[name] for name in names]
        self.missing_counts: dict[str, int] = dict.fromkeys(names, 0)
        keys = [name.encode() for name in names]
        self._index = {key: j for j, key in enumerate(keys)}
        # What the compiled fast path needs to know of the wanted features; it leaves bytes_list alone.
        self._fast = _wire is not None and all(spec.dtype != "bytes_list" for spec in self.specs)
        self._keys = b"".join(keys)
        self._key_ends = np.cumsum([len(key) for key in keys], dtype=np.int64)
        self._kind_tags = bytes(0x0A + 8 * KINDS.index(spec.dtype) for spec in self.specs)
        self._lengths = np.array([spec.length for spec in self.specs], dtype=np.int64)

    def decode_batch(
        self, records: Sequence[bytes], *, file: str = "?", first_index: int = 0
    ) -> dict[str, np.ndarray]:
        """Schema name -> [len(records), length] array: float32 (float_list), int64 (int64_list) or object
        holding bytes (bytes_list). An absent feature takes the default (0, or b"" for bytes)."""
        n = len(records)
        outs = [np.empty((n, spec.length), _DTYPES[spec.dtype]) for spec in self.specs]
        present = np.zeros((n, len(self.specs)), dtype=np.uint8)
        general = []  # the records the compiled path left to the general parser
        r = 0
        while r < n:
            if self._fast:
                r = _wire.decode(
                    records, self._keys, self._key_ends, self._kind_tags, self._lengths, outs, present, r
                )
            if r < n:
                general.append(r)
                r += 1
        if general:
            where = _Where(file, first_index, general)
            self._decode_general(records, np.array(general), outs, present, where)
        self._count_missing(present.astype(bool), file, first_index)
        return {spec.name: out for spec, out in zip(self.specs, outs, strict=True)}

    def _decode_general(
        self,
        records: Sequence[bytes],
        rows: np.ndarray,
        outs: list[np.ndarray],
        present: np.ndarray,
        at: _Where,
    ) -> None:
        """Fills `rows` of outs and present: _parse finds the values of each record, then numpy converts
        them for all these records at once from one joined buffer."""
        m, k = len(rows), len(self.specs)
        buffer = b"".join([records[r] for r in rows])
        starts = np.full((m, k), -1, dtype=np.int64)  # where feature j's values are in buffer; -1: absent
        lengths = np.zeros((m, k), dtype=np.int64)
        byte_lists = {j: [None] * m for j, spec in enumerate(self.specs) if spec.dtype == "bytes_list"}
        patches: list[bytes] = []  # values _parse found in several pieces (unpacked or split lists), joined
        base, patch_at = 0, len(buffer)
        for i, r in enumerate(rows):
            record = records[r]
            for j, (kind, values) in self._parse_record(record, at.file, at.index(i)).items():
                if kind == "bytes_list":
                    byte_lists[j][i] = values
                    starts[i, j] = 0
                elif len(values) == 1:
                    ((a, b),) = values
                    starts[i, j], lengths[i, j] = base + a, b - a
                else:
                    patches.append(b"".join(record[a:b] for a, b in values))
                    starts[i, j], lengths[i, j] = patch_at, len(patches[-1])
                    patch_at += len(patches[-1])
            base += len(record)
        wire = np.frombuffer(b"".join([buffer, *patches]) if patches else buffer, dtype=np.uint8)
        ints = [j for j, spec in enumerate(self.specs) if spec.dtype == "int64_list"]
        if ints:
            specs = [self.specs[j] for j in ints]
            columns = _int64_columns(wire, starts[:, ints], lengths[:, ints], specs, at)
            for j, column in zip(ints, columns, strict=True):
                outs[j][rows] = column
        for j, spec in enumerate(self.specs):
            if spec.dtype == "float_list":
                outs[j][rows] = _float_column(wire, starts[:, j], lengths[:, j], spec, at)
            elif spec.dtype == "bytes_list":
                outs[j][rows] = _bytes_column(byte_lists[j], spec, at)
        present[rows] = starts >= 0

    def _parse_record(self, record: bytes, file: str, index: int) -> dict[int, tuple[str, _Values]]:
        try:
            found = _parse(record, self._index)
        except _Malformed as e:
            raise DataError(f"{file}: record {index}: not a tf.Example: {e}") from None
        for j, (kind, _) in found.items():
            if kind != self.specs[j].dtype:
                raise DataError(
                    f"{file}: record {index}: feature {self.specs[j].name} holds a {kind}, "
                    f"the schema says {self.specs[j].dtype}"
                )
        return found

    def _count_missing(self, present: np.ndarray, file: str, first_index: int) -> None:
        for j in np.flatnonzero(~present.all(axis=0)):
            name, absent = self.specs[j].name, ~present[:, j]
            if not self.missing_counts[name]:
                log.warning(
                    "%s: feature %s is absent from record %d: it takes the schema default; later "
                    "absences are counted in missing_counts, not logged",
                    file,
                    name,
                    first_index + int(np.argmax(absent)),
                )
            self.missing_counts[name] += int(absent.sum())


class _Where:
    """The file and record indices of the rows in hand, for error messages."""

    def __init__(self, file: str, first_index: int, rows: Sequence[int]):
        self.file, self.first_index, self.rows = file, first_index, rows

    def index(self, row: int) -> int:
        return self.first_index + int(self.rows[row])

    def error(self, spec: FeatureSpec, row: int, problem: str) -> DataError:
        return DataError(f"{self.file}: record {self.index(row)}: feature {spec.name}: {problem}")

    def wrong_length(self, spec: FeatureSpec, row: int, count: int) -> DataError:
        return self.error(spec, row, f"{count} values, the schema says {spec.length}")


def _gather(wire: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """Rows wire[s : s + width] for each s in starts, copied by one numpy call: fancy indexing of a view
    whose row i begins at byte i."""
    windows = np.ndarray((wire.size - width + 1, width), np.uint8, buffer=wire, strides=(1, 1))
    return windows[starts]


def _float_column(
    wire: np.ndarray, starts: np.ndarray, lengths: np.ndarray, spec: FeatureSpec, at: _Where
) -> np.ndarray:
    width = 4 * spec.length
    present = starts >= 0
    wrong = np.flatnonzero(present & (lengths != width))
    if wrong.size:
        row = int(wrong[0])
        if lengths[row] % 4:
            raise at.error(spec, row, f"float_list of {lengths[row]} bytes, not a whole number of floats")
        raise at.wrong_length(spec, row, int(lengths[row]) // 4)
    if present.all():
        return _gather(wire, starts, width).view("<f4").astype(np.float32, copy=False)
    out = np.zeros((starts.size, spec.length), dtype=np.float32)
    if present.any():
        out[present] = _gather(wire, starts[present], width).view("<f4")
    return out


def _int64_columns(
    wire: np.ndarray, starts: np.ndarray, lengths: np.ndarray, specs: list[FeatureSpec], at: _Where
) -> list[np.ndarray]:
    """int64 columns [N, length] of several features, their varints decoded together by numpy."""
    feature_of, row_of = np.nonzero(starts.T >= 0)  # feature-major: each feature's rows together, in order
    values, counts, cut = _decode_varints(wire, starts[row_of, feature_of], lengths[row_of, feature_of])
    need = np.array([spec.length for spec in specs])[feature_of]
    for region in np.flatnonzero(cut | (counts != need)):
        spec, row = specs[feature_of[region]], int(row_of[region])
        if cut[region]:
            raise at.error(spec, row, "int64_list data ends inside a varint (or one is over 10 bytes)")
        raise at.wrong_length(spec, row, int(counts[region]))
    outs, done = [], 0
    for f, spec in enumerate(specs):
        rows = row_of[feature_of == f]
        outs.append(np.zeros((starts.shape[0], spec.length), dtype=np.int64))
        outs[-1][rows] = values[done : done + rows.size * spec.length].reshape(-1, spec.length)
        done += rows.size * spec.length
    return outs


def _decode_varints(
    wire: np.ndarray, starts: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decodes the packed varints of the regions wire[s : s + l] together. Returns the values (int64, region
    after region), the count of values in each region, and which regions end inside a varint or hold one
    longer than 10 bytes (their counts are then meaningless)."""
    firsts = np.cumsum(lengths) - lengths
    data = wire[np.repeat(starts - firsts, lengths) + np.arange(int(lengths.sum()))]
    last = data < 0x80  # the final byte of each varint
    if last.all():  # every varint a single byte (flags, labels, small counts): nothing to assemble
        return data.astype(np.int64), lengths, np.zeros(lengths.size, dtype=bool)
    ends = np.flatnonzero(last)
    bounds = firsts + lengths
    counts = np.searchsorted(ends, bounds) - np.searchsorted(ends, firsts)
    cut = (lengths > 0) & ~last[np.maximum(bounds - 1, 0)]
    values = data[ends].astype(np.int64)  # right as it stands for the one-byte varints
    begins = np.concatenate(([0], ends[:-1] + 1))
    sizes = ends - begins + 1
    multi = np.flatnonzero(sizes > 1)
    if multi.size:
        cut[np.searchsorted(bounds, ends[multi[sizes[multi] > 10]], side="right")] = True
        window = np.minimum(begins[multi, None] + np.arange(10), data.size - 1)  # [M, 10] byte indices
        groups = (data[window] & 0x7F).astype(np.uint64)
        groups[np.arange(10) >= sizes[multi, None]] = 0  # bytes past the varint's end
        groups <<= np.arange(0, 70, 7, dtype=np.uint64)  # seven bits per byte, least significant first
        values[multi] = np.bitwise_or.reduce(groups, axis=1).view(np.int64)  # bit 63 set: a negative
    return values, counts, cut


def _bytes_column(rows: list, spec: FeatureSpec, at: _Where) -> np.ndarray:
    out = np.full((len(rows), spec.length), b"", dtype=object)
    for row, values in enumerate(rows):
        if values is not None:
            if len(values) != spec.length:
                raise at.wrong_length(spec, row, len(values))
            out[row, :] = values
    return out


# --- the general parser: every valid encoding, field by field, in Python ---


def _parse(record: bytes, index: Mapping[bytes, int]) -> dict[int, tuple[str, _Values]]:
    """Wanted feature j -> (kind, values) for one record, by protobuf's rules: fields in any order, unknown
    fields skipped, a repeated key replaces the earlier one (map semantics), a repeated Feature or list
    merges into the earlier one (message semantics). values: the (start, stop) byte spans of the packed
    floats or varints (an unpacked value's bytes are its own packed form), or the bytes of a bytes_list.
    A Feature with no list set is left out: absent."""
    found: dict[int, tuple[str, _Values]] = {}
    for field, wire, start, stop in _fields(record, 0, len(record)):
        if field != 1 or wire != _LEN:
            continue
        for entry_field, entry_wire, a, b in _fields(record, start, stop):
            if entry_field != 1 or entry_wire != _LEN:
                continue
            key, feature = b"", []
            for part, part_wire, c, d in _fields(record, a, b):
                if part == 1 and part_wire == _LEN:
                    key = record[c:d]
                elif part == 2 and part_wire == _LEN:
                    feature.append((c, d))
            j = index.get(key)
            if j is not None:
                kind, values = _feature(record, feature)
                if kind is None:
                    found.pop(j, None)
                else:
                    found[j] = (kind, values)
    return found


def _feature(record: bytes, spans: _Spans) -> tuple[str | None, _Values]:
    kind, values = None, []
    for start, stop in spans:
        for field, wire, a, b in _fields(record, start, stop):
            if 1 <= field <= 3 and wire == _LEN:
                if KINDS[field - 1] != kind:  # setting another member of a oneof clears the first
                    kind, values = KINDS[field - 1], []
                values.extend(_list(record, a, b, kind))
    return kind, values


def _list(record: bytes, start: int, stop: int, kind: str) -> _Values:
    expected = {"bytes_list": (_LEN,), "float_list": (_LEN, _I32), "int64_list": (_LEN, _VARINT)}[kind]
    values = []
    for field, wire, a, b in _fields(record, start, stop):
        if field != 1:
            continue
        if wire not in expected:
            raise _Malformed(f"a {kind} value of wire type {wire}")
        if kind == "bytes_list":
            values.append(record[a:b])
        else:
            if kind == "float_list" and (b - a) % 4:
                raise _Malformed(f"packed floats of {b - a} bytes, not a whole number of floats")
            values.append((a, b))
    return values


def _fields(buf: bytes, pos: int, end: int):
    """(field number, wire type, start, stop) of each field of the message buf[pos:end]; start:stop holds
    the value (a length-delimited field's payload, a varint's bytes, a fixed field's bytes)."""
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        wire = tag & 7
        if tag >> 3 == 0:
            raise _Malformed("field number 0")
        start = pos
        if wire == _VARINT:
            _, pos = _varint(buf, pos, end)
        elif wire == _LEN:
            size, start = _varint(buf, pos, end)
            pos = start + size
        elif wire in (_I64, _I32):
            pos += 8 if wire == _I64 else 4
        else:
            raise _Malformed(f"wire type {wire} (groups are not used by tf.Example)")
        if pos > end:
            raise _Malformed(f"a field runs {pos - end} bytes past the end of its message")
        yield tag >> 3, wire, start, pos


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        if pos >= end:
            break
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
    raise _Malformed("a varint is cut short or longer than 10 bytes")


# --- encoding ---


def encode_example(features: Mapping[str, np.ndarray | Sequence], *, packed: bool = True) -> bytes:
    """tf.Example wire bytes. Floats become a float_list (float32), integers and bools an int64_list,
    bytes or str a bytes_list. packed=False writes one tagged field per value instead of one packed run:
    equally valid protobuf, which some writers emit and every reader must accept."""
    entries = [
        _len_field(1, name.encode()) + _len_field(2, _encode_feature(values, packed))
        for name, values in features.items()
    ]
    return _len_field(1, b"".join(_len_field(1, entry) for entry in entries))


def _encode_feature(values: np.ndarray | Sequence, packed: bool) -> bytes:
    if isinstance(values, np.ndarray) and values.dtype.kind in "OSU":
        values = values.ravel().tolist()
    if not isinstance(values, np.ndarray) and any(isinstance(v, (bytes, str)) for v in values):
        items = [v.encode() if isinstance(v, str) else bytes(v) for v in values]
        return _len_field(1, b"".join(_len_field(1, item) for item in items))
    array = np.asarray(values).ravel()
    if array.dtype.kind == "f":
        data = array.astype("<f4")
        if not packed:  # per value: tag 0x0d (field 1, fixed32) and four bytes
            rows = np.empty((data.size, 5), dtype=np.uint8)
            rows[:, 0], rows[:, 1:] = 0x0D, data.view(np.uint8).reshape(-1, 4)
            return _len_field(2, rows.tobytes())
        return _len_field(2, _len_field(1, data.tobytes()) if data.size else b"")
    if array.dtype.kind in "biu":
        ints = array.astype(np.int64)
        if not packed:  # per value: tag 0x08 (field 1, varint), itself the varint 8, then the value
            return _len_field(3, encode_varints(np.stack([np.full_like(ints, 8), ints], axis=1)))
        return _len_field(3, _len_field(1, encode_varints(ints)) if ints.size else b"")
    raise TypeError(f"cannot encode values of dtype {array.dtype} as a tf.Example feature")


def encode_varints(values: np.ndarray) -> bytes:
    """Protobuf varints of int64 values (negatives in ten bytes), vectorized."""
    v = np.ascontiguousarray(values, dtype=np.int64).ravel().view(np.uint64)
    if v.size <= 8:  # a label or an id: numpy's call overhead would dominate
        return b"".join(varint_bytes(x) for x in v.tolist())
    sizes = 1 + np.searchsorted(_VARINT_LIMITS, v, side="right")  # bytes per value, 1..10
    if sizes.max() == 1:
        return v.astype(np.uint8).tobytes()
    ends = np.cumsum(sizes)
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    for k in range(int(sizes.max())):  # the k-th byte of every value that has one
        take = np.flatnonzero(sizes > k)
        group = ((v[take] >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        out[ends[take] - sizes[take] + k] = group | np.where(sizes[take] > k + 1, 0x80, 0).astype(np.uint8)
    return out.tobytes()


def _len_field(number: int, payload: bytes) -> bytes:
    """A length-delimited field: tag, varint length, payload."""
    if len(payload) < 0x80:
        return bytes((number << 3 | _LEN, len(payload))) + payload
    return bytes((number << 3 | _LEN,)) + varint_bytes(len(payload)) + payload


def varint_bytes(value: int) -> bytes:
    """One non-negative value as a protobuf varint."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
