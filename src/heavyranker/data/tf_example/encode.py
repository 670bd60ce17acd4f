"""tf.Example encoding, for synthetic data and tests: `encode_example` writes one record from a mapping of
values, in every valid layout the decoder must read; `encode_tf_examples` writes a record per row of
[n, length] arrays, vectorized."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .wire import encode_varints, len_field, len_head, varint_sizes


def encode_example(features: Mapping[str, np.ndarray | Sequence], *, packed: bool = True) -> bytes:
    """tf.Example wire bytes. Floats become a float_list (float32), integers and bools an int64_list,
    bytes or str a bytes_list. packed=False writes one tagged field per value instead of one packed run:
    equally valid protobuf, which some writers emit and every reader must accept."""
    entries = [
        len_field(1, name.encode()) + len_field(2, _encode_feature(values, packed))
        for name, values in features.items()
    ]
    return len_field(1, b"".join(len_field(1, entry) for entry in entries))


def _encode_feature(values: np.ndarray | Sequence, packed: bool) -> bytes:
    if isinstance(values, np.ndarray) and values.dtype.kind in "OSU":
        values = values.ravel().tolist()
    if not isinstance(values, np.ndarray) and any(isinstance(v, (bytes, str)) for v in values):
        items = [v.encode() if isinstance(v, str) else bytes(v) for v in values]
        return len_field(1, b"".join(len_field(1, item) for item in items))
    array = np.asarray(values).ravel()
    if array.dtype.kind == "f":
        data = array.astype("<f4")
        if not packed:  # per value: tag 0x0d (field 1, fixed32) and four bytes
            rows = np.empty((data.size, 5), dtype=np.uint8)
            rows[:, 0], rows[:, 1:] = 0x0D, data.view(np.uint8).reshape(-1, 4)
            return len_field(2, rows.tobytes())
        return len_field(2, len_field(1, data.tobytes()) if data.size else b"")
    if array.dtype.kind in "biu":
        ints = array.astype(np.int64)
        if not packed:  # per value: tag 0x08 (field 1, varint), itself the varint 8, then the value
            return len_field(3, encode_varints(np.stack([np.full_like(ints, 8), ints], axis=1)))
        return len_field(3, len_field(1, encode_varints(ints)) if ints.size else b"")
    raise TypeError(f"cannot encode values of dtype {array.dtype} as a tf.Example feature")


def encode_tf_examples(features: dict[str, np.ndarray]) -> list[bytes]:
    """One serialized tf.Example per row of the [n, length] arrays: float32 -> float_list, int64 ->
    int64_list, bytes objects -> bytes_list, packed. The bytes of encode_example, except that map entries
    of one size in every row come first (map order is free in protobuf). Vectorized: a per-record encoder
    costs ~30 us a row, too slow for a few hundred thousand; here numpy lays out whole columns and Python
    joins three slices per row."""
    n = len(next(iter(features.values())))
    fixed, ragged = [], []
    for name, values in features.items():
        payload, sizes = _payloads(values)
        heads = {size: _entry_head(name, values.dtype, size) for size in np.unique(sizes).tolist()}
        if len(heads) == 1:
            head = np.frombuffer(heads[int(sizes[0])], np.uint8)
            fixed += [np.broadcast_to(head, (n, head.size)), payload.reshape(n, -1)]
        else:
            row_heads = [heads[size] for size in sizes.tolist()]
            ragged += [
                (np.frombuffer(b"".join(row_heads), np.uint8), np.array([len(h) for h in row_heads])),
                (payload, sizes),
            ]
    block = np.hstack(fixed).tobytes() if fixed else b""
    width = len(block) // n
    tail, tail_sizes = _ragged_rows(ragged, n)
    tail_bytes = tail.tobytes()
    example_heads: dict[int, bytes] = {}  # Example field 1 (Features) and its size, by size
    out = []
    start = 0
    for i, end in enumerate(np.cumsum(tail_sizes).tolist()):
        size = width + end - start
        head = example_heads.get(size) or example_heads.setdefault(size, len_head(1, size))
        out.append(head + block[i * width : (i + 1) * width] + tail_bytes[start:end])
        start = end
    return out


def _payloads(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every row's list payload, flat (uint8), and each row's size in bytes."""
    n = len(values)
    if values.dtype == np.float32:
        return values.astype("<f4").view(np.uint8).ravel(), np.full(n, 4 * values.shape[1])
    if values.dtype == object:  # bytes: each value a length-delimited field 1
        rows = [b"".join(len_field(1, v) for v in row) for row in values]
        return np.frombuffer(b"".join(rows), np.uint8), np.array([len(r) for r in rows])
    return np.frombuffer(encode_varints(values), np.uint8), varint_sizes(values).sum(axis=1)


def _entry_head(name: str, dtype: np.dtype, size: int) -> bytes:
    """A Features map entry (field 1 of Features) up to its list payload of `size` bytes."""
    field = {np.dtype(np.float32): 2, np.dtype(np.int64): 3}.get(np.dtype(dtype), 1)  # of Feature's oneof
    packed = b"" if size == 0 or field == 1 else len_head(1, size)  # bytes values are not packed
    feature = len_head(field, len(packed) + size) + packed
    entry = len_field(1, name.encode()) + len_head(2, len(feature) + size) + feature
    return len_head(1, len(entry) + size) + entry


def _ragged_rows(pieces: list[tuple[np.ndarray, np.ndarray]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row i of the result is row i of piece 0, then of piece 1, ...; a piece is (flat bytes, bytes per
    row). Returns the flat result and its bytes per row."""
    if not pieces:
        return np.zeros(0, np.uint8), np.zeros(n, np.int64)
    sizes = np.stack([size for _, size in pieces], axis=1)  # [n, pieces]
    starts = (np.cumsum(sizes.ravel()) - sizes.ravel()).reshape(sizes.shape)
    out = np.empty(int(sizes.sum()), np.uint8)
    for k, (flat, size) in enumerate(pieces):
        out[np.repeat(starts[:, k] - (np.cumsum(size) - size), size) + np.arange(flat.size)] = flat
    return out, sizes.sum(axis=1)
