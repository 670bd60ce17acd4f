"""tf.Example decoding: a batch decoder written for speed.

Hand-written because TensorFlow is not a dependency and protobuf's Python objects cost one Python object
per value (6,000 floats per seed record). Decoding never makes one Python object per value: the usual
layout (every wanted feature one packed run of the schema's length) is decoded by the compiled
`_wire.decode` (_wire.c, here) straight from the wire bytes into the output arrays, at about 4 us per seed
record. Every record it declines (unpacked values, other field orders, a bytes_list, damage), and every
record when it is not built, goes to the general path: `_parse` walks the record's fields in Python and
notes where each wanted feature's values lie, then numpy converts the values of all those records at once.
Measured on seed records, a Python walk alone costs about 20 us and the numpy conversion about 10 us.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from ...errors import DataError, UserError
from ...schema import FeatureSpec
from .wire import I32, I64, KINDS, LEN, VARINT

log = logging.getLogger(__name__)

try:
    from . import _wire  # built from _wire.c by `pip install`
except ImportError:  # no compiler at install time: every record takes the general parser
    _wire = None
    log.warning(
        "heavyranker.data.tf_example._wire is not built (reinstall with gcc available): tf.Example decoding "
        "runs in pure Python, several times slower"
    )

_DTYPES = {"bytes_list": object, "float_list": np.float32, "int64_list": np.int64}
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
        if field != 1 or wire != LEN:
            continue
        for entry_field, entry_wire, a, b in _fields(record, start, stop):
            if entry_field != 1 or entry_wire != LEN:
                continue
            key, feature = b"", []
            for part, part_wire, c, d in _fields(record, a, b):
                if part == 1 and part_wire == LEN:
                    key = record[c:d]
                elif part == 2 and part_wire == LEN:
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
            if 1 <= field <= 3 and wire == LEN:
                if KINDS[field - 1] != kind:  # setting another member of a oneof clears the first
                    kind, values = KINDS[field - 1], []
                values.extend(_list(record, a, b, kind))
    return kind, values


def _list(record: bytes, start: int, stop: int, kind: str) -> _Values:
    expected = {"bytes_list": (LEN,), "float_list": (LEN, I32), "int64_list": (LEN, VARINT)}[kind]
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
        if wire == VARINT:
            _, pos = _varint(buf, pos, end)
        elif wire == LEN:
            size, start = _varint(buf, pos, end)
            pos = start + size
        elif wire in (I64, I32):
            pos += 8 if wire == I64 else 4
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
