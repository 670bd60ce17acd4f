"""The protobuf wire format of tf.Example, and the varint and length-delimited primitives of both
directions.

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

import numpy as np

KINDS = ("bytes_list", "float_list", "int64_list")  # Feature's oneof, field numbers 1, 2, 3
VARINT, I64, LEN, I32 = 0, 1, 2, 5  # protobuf wire types
_VARINT_LIMITS = np.array([1 << (7 * k) for k in range(1, 10)], dtype=np.uint64)  # 2**7 ... 2**63


def varint_bytes(value: int) -> bytes:
    """One non-negative value as a protobuf varint."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def varint_sizes(values: np.ndarray) -> np.ndarray:
    """The bytes of each int64 value's varint, 1..10 (a negative takes ten), in the shape of values."""
    return 1 + np.searchsorted(_VARINT_LIMITS, values.view(np.uint64), side="right")


def encode_varints(values: np.ndarray) -> bytes:
    """Protobuf varints of int64 values (negatives in ten bytes), vectorized."""
    ints = np.ascontiguousarray(values, dtype=np.int64).ravel()
    v = ints.view(np.uint64)
    if v.size <= 8:  # a label or an id: numpy's call overhead would dominate
        return b"".join(varint_bytes(x) for x in v.tolist())
    sizes = varint_sizes(ints)
    if sizes.max() == 1:
        return v.astype(np.uint8).tobytes()
    ends = np.cumsum(sizes)
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    for k in range(int(sizes.max())):  # the k-th byte of every value that has one
        take = np.flatnonzero(sizes > k)
        group = ((v[take] >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        out[ends[take] - sizes[take] + k] = group | np.where(sizes[take] > k + 1, 0x80, 0).astype(np.uint8)
    return out.tobytes()


def len_head(number: int, size: int) -> bytes:
    """The start of a length-delimited field whose payload has `size` bytes: tag, varint length."""
    if size < 0x80:
        return bytes((number << 3 | LEN, size))
    return bytes((number << 3 | LEN,)) + varint_bytes(size)


def len_field(number: int, payload: bytes) -> bytes:
    """A length-delimited field: tag, varint length, payload."""
    return len_head(number, len(payload)) + payload
