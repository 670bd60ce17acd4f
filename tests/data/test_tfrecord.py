"""TFRecord framing and checksums against records built by hand from the format's definition."""

import gzip
import logging
import os
import struct
import tracemalloc

import crc32c
import pytest

from heavyranker.data.sources.tfrecord import masked_crc32c, read_records, write_records
from heavyranker.errors import DataError

RECORDS = [b"first", b"", bytes(range(256)) * 3, b"\x00" * 1000, b"last one"]


def spec_masked_crc(data: bytes) -> int:
    """The TFRecord definition: rotate the CRC32C right by 15 bits, add 0xa282ead8, modulo 2**32."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) % 2**32


def frame(payload: bytes) -> bytes:
    length = struct.pack("<Q", len(payload))
    return (
        length
        + struct.pack("<I", spec_masked_crc(length))
        + payload
        + struct.pack("<I", spec_masked_crc(payload))
    )


def hand_built(records=RECORDS) -> bytes:
    return b"".join(frame(r) for r in records)


def write(path, data: bytes, compress: bool) -> str:
    with open(path, "wb") as f:
        f.write(gzip.compress(data) if compress else data)
    return str(path)


def test_crc32c_known_values():
    assert crc32c.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert masked_crc32c(b"") == 0xA282EAD8  # crc 0: only the added constant
    # 0xE3069283 rotated right by 15 bits is 0x2506C60D; plus 0xA282EAD8 is 0xC78AB0E5 (mod 2**32).
    assert masked_crc32c(b"123456789") == 0xC78AB0E5
    assert masked_crc32c(b"123456789") == spec_masked_crc(b"123456789")


@pytest.mark.parametrize("compress", [False, True])
def test_reads_hand_built_files(tmp_path, compress):
    path = write(tmp_path / "data.tfrecord", hand_built(), compress)
    assert list(read_records(path)) == RECORDS


def test_reads_multi_member_gzip_written_by_python(tmp_path):
    # Concatenated gzip members are one valid gzip stream (as `cat a.gz b.gz` makes).
    path = tmp_path / "two_members.gz"
    path.write_bytes(gzip.compress(hand_built(RECORDS[:2])) + gzip.compress(hand_built(RECORDS[2:])))
    assert list(read_records(str(path))) == RECORDS


@pytest.mark.parametrize("name, compressed", [("out.tfrecord", False), ("out.gz", True)])
def test_write_records_framing_and_compression_default(tmp_path, name, compressed):
    path = str(tmp_path / name)
    write_records(path, iter(RECORDS))
    raw = open(path, "rb").read()
    assert (raw[:2] == b"\x1f\x8b") == compressed
    assert (gzip.decompress(raw) if compressed else raw) == hand_built()
    assert list(read_records(path)) == RECORDS
    assert os.listdir(tmp_path) == [name]  # no temporary file left behind


def test_write_records_compress_overrides_the_name(tmp_path):
    path = str(tmp_path / "plain.gz")
    write_records(path, RECORDS, compress=False)
    assert open(path, "rb").read() == hand_built()


def test_write_records_is_atomic(tmp_path):
    path = str(tmp_path / "out.gz")

    def failing():
        yield b"one"
        raise RuntimeError("the generator broke")

    with pytest.raises(RuntimeError):
        write_records(path, failing())
    assert os.listdir(tmp_path) == []  # neither a half file under the name nor a temporary one


def cut_header(data: bytes) -> tuple[bytes, int]:
    return hand_built(RECORDS[:3]) + frame(RECORDS[3])[:5], 3


def cut_payload(data: bytes) -> tuple[bytes, int]:
    return hand_built(RECORDS[:3]) + frame(RECORDS[3])[:40], 3


def cut_footer(data: bytes) -> tuple[bytes, int]:
    return hand_built(RECORDS[:4]) + frame(RECORDS[4])[:-2], 4


def bad_length_crc(data: bytes) -> tuple[bytes, int]:
    broken = bytearray(frame(RECORDS[2]))
    broken[9] ^= 0x01
    return hand_built(RECORDS[:2]) + bytes(broken) + hand_built(RECORDS[3:]), 2


def bad_length(data: bytes) -> tuple[bytes, int]:
    broken = bytearray(frame(RECORDS[2]))
    broken[0] ^= 0x04  # the length itself; its checksum no longer matches
    return hand_built(RECORDS[:2]) + bytes(broken) + hand_built(RECORDS[3:]), 2


def bad_data_crc(data: bytes) -> tuple[bytes, int]:
    broken = bytearray(frame(RECORDS[2]))
    broken[20] ^= 0x80  # a payload byte
    return hand_built(RECORDS[:2]) + bytes(broken) + hand_built(RECORDS[3:]), 2


DAMAGE = [cut_header, cut_payload, cut_footer, bad_length_crc, bad_length, bad_data_crc]


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("damage", DAMAGE)
def test_damage_names_file_and_record(tmp_path, damage, compress):
    data, bad_index = damage(hand_built())
    path = write(tmp_path / "damaged.gz", data, compress)
    seen = []
    with pytest.raises(DataError, match=rf"{path}: record {bad_index}\b"):
        for record in read_records(path):
            seen.append(record)
    assert seen == RECORDS[:bad_index]  # every complete record before the damage, none after


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("damage", DAMAGE)
def test_ignore_errors_keeps_good_records_and_logs_once(tmp_path, caplog, damage, compress):
    data, bad_index = damage(hand_built())
    path = write(tmp_path / "damaged.tfrecord", data, compress)
    with caplog.at_level(logging.WARNING):
        assert list(read_records(path, ignore_errors=True)) == RECORDS[:bad_index]
    (message,) = [r.getMessage() for r in caplog.records]
    assert path in message and f"read {bad_index} records" in message and "skipped" in message


def test_empty_file(tmp_path, caplog):
    path = write(tmp_path / "empty.gz", b"", compress=False)
    with pytest.raises(DataError, match=rf"{path}: record 0: the file is empty"):
        list(read_records(path))
    with caplog.at_level(logging.WARNING):
        assert list(read_records(path, ignore_errors=True)) == []
    assert len(caplog.records) == 1 and path in caplog.records[0].getMessage()


def test_gzip_holding_no_records(tmp_path):
    path = write(tmp_path / "nothing.gz", b"", compress=True)
    with pytest.raises(DataError, match=rf"{path}: record 0: the file holds no records"):
        list(read_records(path))


def test_gz_file_that_is_not_gzip(tmp_path, caplog):
    path = str(tmp_path / "garbage.gz")
    with open(path, "wb") as f:
        f.write(b"this is not a gzip file, nor a TFRecord" * 10)
    with pytest.raises(DataError, match=rf"{path}: record 0: .*not gzip-compressed"):
        list(read_records(path))
    with caplog.at_level(logging.WARNING):
        assert list(read_records(path, ignore_errors=True)) == []
    assert len(caplog.records) == 1 and "read 0 records" in caplog.records[0].getMessage()


def test_truncated_gzip_stream(tmp_path, caplog):
    records = [bytes([i]) * 1000 for i in range(200)]
    path = write(tmp_path / "cut.gz", b"", compress=False)
    with open(path, "wb") as f:
        f.write(gzip.compress(hand_built(records))[:-30])  # the trailer and the last record's end are gone
    with pytest.raises(DataError, match=rf"{path}: record \d+: .*ended before the end-of-stream"):
        list(read_records(path))
    with caplog.at_level(logging.WARNING):
        seen = list(read_records(path, ignore_errors=True))
    # Complete records only, in order; ISA-L's reader drops the data of its last read (a few KiB) too.
    assert seen == records[: len(seen)] and len(seen) >= len(records) - 12
    assert len(caplog.records) == 1 and f"read {len(seen)} records" in caplog.records[0].getMessage()


def test_corrupt_gzip_data(tmp_path):
    compressed = bytearray(gzip.compress(hand_built() * 20))
    compressed[len(compressed) // 2] ^= 0xFF
    path = write(tmp_path / "corrupt.gz", b"", compress=False)
    with open(path, "wb") as f:
        f.write(compressed)
    with pytest.raises(DataError, match=rf"{path}: record \d+: "):
        list(read_records(path))


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="nope.gz: record 0: .*FileNotFoundError"):
        list(read_records(str(tmp_path / "nope.gz")))


def test_memory_does_not_grow_with_file_size(tmp_path):
    path = str(tmp_path / "big.gz")
    payload = os.urandom(1 << 18)
    write_records(path, (payload for _ in range(48)))  # 12 MiB of records
    tracemalloc.start()
    count = sum(1 for _ in read_records(path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == 48
    assert peak < 3 * len(payload) + (1 << 20)  # a record or two in flight, not the file
