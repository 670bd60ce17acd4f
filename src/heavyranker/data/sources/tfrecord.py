"""TFRecord files, GZIP-compressed or not, without TensorFlow.

A record is: length (uint64 little-endian), masked CRC32C of those 8 bytes (uint32), payload, masked
CRC32C of the payload (uint32). Files are streamed, so memory does not grow with file size; a record is
yielded only once it is complete and both checksums match.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from collections.abc import Iterable, Iterator
from typing import BinaryIO

import crc32c
from isal import igzip, isal_zlib

from ...atomic import atomic_write
from ...errors import DataError
from ..storage import open_binary

log = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b"
_MAX_LENGTH = 1 << 31  # protobuf's limit on a message: a longer length prefix is damage, not data
_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")


class _Damage(Exception):
    """Why the file cannot be read past the current record; read_records adds file and record index."""


def masked_crc32c(data: bytes) -> int:
    """The TFRecord checksum: CRC32C rotated right by 15 bits plus a constant, so that a CRC of data that
    itself holds CRCs does not come out trivially."""
    # Payloads are checksummed without the GIL, so that reader threads work in parallel.
    crc = crc32c.crc32c(data, gil_release_mode=int(len(data) >= 4096))
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(path: str, *, ignore_errors: bool = False) -> Iterator[bytes]:
    """The payloads of the TFRecord file at `path` (a local path or an fsspec URL; GZIP detected by its
    magic bytes), in order.

    A damaged file (truncated, bad checksum, bad gzip data, empty) raises DataError naming the file and
    the record index; the records before the damage have been yielded by then. With ignore_errors=True it
    logs one warning for the file instead and stops reading it. A caller that wants to count damaged
    files itself leaves ignore_errors off and catches DataError. (A gzip stream cut short also loses
    the records of ISA-L's last read, a few KiB before the cut.)"""
    index = 0
    try:
        with _open(path) as (stream, hint):
            for record in _records(stream, hint):
                yield record
                index += 1
        if index == 0:
            raise _Damage("the file holds no records")
    except (_Damage, OSError, EOFError, isal_zlib.error) as e:  # OSError: also gzip's BadGzipFile
        reason = str(e) if isinstance(e, _Damage) else f"unreadable ({type(e).__name__}: {e})"
        if not ignore_errors:
            raise DataError(f"{path}: record {index}: {reason}") from None
        log.warning(
            "%s: read %d records, skipped the rest of the file: record %d: %s", path, index, index, reason
        )


def write_records(path: str, records: Iterable[bytes], *, compress: bool | None = None) -> None:
    """Writes `records` as a TFRecord file, GZIP-compressed when `compress` (default: path ends in .gz).
    The file appears under its name only once complete (written to a temporary name, then renamed)."""
    compress = path.endswith(".gz") if compress is None else compress
    # filename="" and mtime=0 keep the gzip header free of the temporary name and the time, so that the
    # same records make the same file.
    with (
        atomic_write(path) as raw,
        (
            igzip.IGzipFile(filename="", fileobj=raw, mode="wb", mtime=0)
            if compress
            else contextlib.nullcontext(raw)
        ) as f,
    ):
        for record in records:
            length = struct.pack("<Q", len(record))
            f.write(_HEADER.pack(len(record), masked_crc32c(length)))
            f.write(record)
            f.write(_FOOTER.pack(masked_crc32c(record)))


@contextlib.contextmanager
def _open(path: str) -> Iterator[tuple[BinaryIO, str]]:
    """The stream of TFRecord bytes, and a hint for a bad first checksum."""
    with open_binary(path) as raw:
        magic = raw.read(2)
        raw.seek(0)
        if not magic:
            raise _Damage("the file is empty")
        if magic != GZIP_MAGIC:
            yield raw, "; the file is not gzip-compressed" if path.endswith(".gz") else ""
            return
        with igzip.IGzipFile(fileobj=raw, mode="rb") as unzipped:
            yield unzipped, ""


def _records(stream: BinaryIO, hint: str) -> Iterator[bytes]:
    # Three reads per record from a buffered stream. ISA-L's gzip reader inflates straight into the
    # stream's buffer; a hand-rolled isal_zlib.decompressobj loop measured 2 us per record slower.
    header_size = _HEADER.size
    while True:
        header = stream.read(header_size)
        if len(header) < header_size:
            if header:
                raise _Damage(f"cut short in the record header ({len(header)} of {header_size} bytes)")
            return
        length, length_crc = _HEADER.unpack(header)
        if masked_crc32c(header[:8]) != length_crc:
            raise _Damage(
                f"the length's checksum does not match (corrupt data, or not a TFRecord file{hint})"
            )
        if length > _MAX_LENGTH:
            raise _Damage(f"a record length of {length} bytes, beyond protobuf's 2 GiB")
        payload = stream.read(length)
        footer = stream.read(4)
        if len(payload) < length or len(footer) < 4:
            raise _Damage(
                f"cut short: {len(payload) + len(footer)} of the {length + 4} bytes of payload and checksum"
            )
        if masked_crc32c(payload) != _FOOTER.unpack(footer)[0]:
            raise _Damage("the payload's checksum does not match (corrupt data)")
        yield payload
