"""The tf.Example codec: decoding against protobuf bytes built by hand, through the compiled fast path and
the pure-Python parser alike; the encoders against those bytes and each other."""

import logging
import struct

import numpy as np
import pytest

from heavyranker.data.tf_example import (
    ExampleDecoder,
    decode,
    encode_example,
    encode_tf_examples,
    encode_varints,
)
from heavyranker.errors import DataError, UserError
from heavyranker.schema import FeatureSpec

# --- protobuf by hand, from the wire format's definition ---


def varint(n: int) -> bytes:
    n &= 2**64 - 1  # int64 negatives: two's complement, ten bytes
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def ld(tag: int, payload: bytes) -> bytes:
    """A length-delimited field: tag byte, varint length, payload."""
    return bytes([tag]) + varint(len(payload)) + payload


def floats(values, packed=True) -> bytes:  # Feature.float_list (field 2) {FloatList.value (field 1)}
    if packed:
        return ld(0x12, ld(0x0A, struct.pack(f"<{len(values)}f", *values)) if values else b"")
    return ld(0x12, b"".join(b"\x0d" + struct.pack("<f", v) for v in values))  # 0x0d: field 1, fixed32


def ints(values, packed=True) -> bytes:  # Feature.int64_list (field 3) {Int64List.value (field 1)}
    if packed:
        return ld(0x1A, ld(0x0A, b"".join(varint(v) for v in values)) if values else b"")
    return ld(0x1A, b"".join(b"\x08" + varint(v) for v in values))  # 0x08: field 1, varint


def strings(values) -> bytes:  # Feature.bytes_list (field 1) {BytesList.value (field 1)}
    return ld(0x0A, b"".join(ld(0x0A, v) for v in values))


def entry(key: str, feature: bytes) -> bytes:  # Features.feature map entry {1: key, 2: Feature}
    return ld(0x0A, ld(0x0A, key.encode()) + ld(0x12, feature))


def record(*entries: bytes) -> bytes:  # Example {1: Features {1: entries}}
    return ld(0x0A, b"".join(entries))


SPECS = {
    "dense": FeatureSpec("dense", "float_list", 3),
    "counts": FeatureSpec("counts", "int64_list", 4),
    "label": FeatureSpec("label", "int64_list", 1),
    "id": FeatureSpec("id", "int64_list", 1),
}
BIG = [-1, 2**53 + 1, 2**63 - 1, -(2**63)]  # not exact as float64; ten-byte negatives


@pytest.fixture(params=["compiled", "python"])
def decoder(request, monkeypatch):
    """ExampleDecoder factory, once with the compiled fast path and once with the pure-Python parser."""
    if request.param == "python":
        monkeypatch.setattr(decode, "_wire", None)
    elif decode._wire is None:
        pytest.skip("heavyranker.data.tf_example._wire is not built")
    return lambda specs=SPECS, wanted=None: ExampleDecoder(specs, list(specs) if wanted is None else wanted)


def test_a_record_spelled_out_byte_by_byte(decoder):
    three_floats = struct.pack("<3f", 0.5, -2.0, 3e38)
    raw = (
        b"\x0a\x2a"  # Example.features: 42 bytes
        b"\x0a\x19"  # map entry: 25 bytes
        b"\x0a\x05dense"  # key
        b"\x12\x10\x12\x0e\x0a\x0c"
        + three_floats  # value: Feature{float_list{packed: 12 bytes}}
        + b"\x0a\x0d"  # map entry: 13 bytes
        b"\x0a\x05label"  # key
        b"\x12\x04\x1a\x02\x08\x01"  # value: Feature{int64_list{one unpacked value: 1}}
    )
    assert record(entry("dense", floats([0.5, -2.0, 3e38])), entry("label", ints([1], packed=False))) == raw
    out = decoder(SPECS, ["dense", "label"]).decode_batch([raw])
    assert out["dense"].dtype == np.float32 and out["label"].dtype == np.int64
    np.testing.assert_array_equal(out["dense"], np.array([[0.5, -2.0, 3e38]], dtype=np.float32))
    np.testing.assert_array_equal(out["label"], [[1]])


@pytest.mark.parametrize("packed", [True, False])
def test_packed_and_unpacked_values(decoder, packed):
    rows = [
        ([1.5, 0.0, -7.25], [0, 1, 127, 128], [1], [2**62]),
        ([3.0, 1e-3, 2.0**-130], [300, 16383, 16384, 2**40], [0], [BIG[1]]),
    ]
    records = [
        record(
            entry("dense", floats(d, packed)),
            entry("counts", ints(c, packed)),
            entry("label", ints(label, packed)),
            entry("id", ints(i, packed)),
        )
        for d, c, label, i in rows
    ]
    out = decoder().decode_batch(records)
    np.testing.assert_array_equal(out["dense"], np.array([r[0] for r in rows], dtype=np.float32))
    np.testing.assert_array_equal(out["counts"], np.array([r[1] for r in rows], dtype=np.int64))
    np.testing.assert_array_equal(out["label"], [[1], [0]])
    assert out["id"][:, 0].tolist() == [2**62, 2**53 + 1]


@pytest.mark.parametrize("packed", [True, False])
def test_int64_negatives_and_beyond_float64(decoder, packed):
    assert varint(-1) == b"\xff" * 9 + b"\x01"
    specs = {"counts": FeatureSpec("counts", "int64_list", 4)}
    out = decoder(specs).decode_batch([record(entry("counts", ints(BIG, packed)))] * 3)
    assert out["counts"].tolist() == [BIG] * 3  # exact: compared as Python ints


def test_many_records_mixed_with_a_big_value_in_few(decoder):
    # One-byte runs take a gather-and-cast path, the rest the batch varint decoder: mix them.
    rng = np.random.default_rng(0)
    values = rng.integers(0, 128, size=(50, 4))
    values[[3, 17, 40], [0, 2, 3]] = [128, 2**35, -5]
    records = [record(entry("counts", ints(row.tolist()))) for row in values]
    out = decoder(SPECS, ["counts"]).decode_batch(records)
    np.testing.assert_array_equal(out["counts"], values)


def test_bytes_list(decoder):
    specs = {"tags": FeatureSpec("tags", "bytes_list", 2), "label": SPECS["label"]}
    records = [
        record(entry("tags", strings([b"a", b"\x00\xff"])), entry("label", ints([1]))),
        record(entry("label", ints([0]))),
    ]
    out = decoder(specs).decode_batch(records)
    assert out["tags"].dtype == object and out["tags"].tolist() == [[b"a", b"\x00\xff"], [b"", b""]]
    assert out["label"].tolist() == [[1], [0]]


def test_unwanted_features_are_not_decoded(decoder, monkeypatch):
    garbage = b"\x12\x03\x0a\x01\x80"  # a float_list of one byte: not decodable
    near_misses = [entry(key, ints([7, 7])) for key in ("labe", "label2", "Label", "")]  # keys like "label"
    raw = record(
        entry("other", garbage), *near_misses, entry("label", ints([1])), entry("dense", floats([1]))
    )
    out = decoder(SPECS, ["label"]).decode_batch([raw])
    assert list(out) == ["label"] and out["label"].tolist() == [[1]]
    assert decoder(SPECS, []).decode_batch([raw]) == {}


def test_absent_feature_takes_the_default_counted_and_logged_once(decoder, caplog):
    dec = decoder(SPECS, ["dense", "label"])
    with_label = record(entry("dense", floats([1, 2, 3])), entry("label", ints([1])))
    without = record(entry("dense", floats([4, 5, 6])))
    with caplog.at_level(logging.WARNING):
        out = dec.decode_batch([with_label, without, without], file="f.gz", first_index=10)
        dec.decode_batch([without], file="f.gz", first_index=13)
    assert out["label"].tolist() == [[1], [0], [0]]
    np.testing.assert_array_equal(out["dense"], [[1, 2, 3], [4, 5, 6], [4, 5, 6]])
    assert dec.missing_counts == {"dense": 0, "label": 3}
    (message,) = [r.getMessage() for r in caplog.records]
    assert "f.gz" in message and "label" in message and "record 11" in message


def test_absent_everywhere_and_empty_record(decoder):
    out = decoder().decode_batch([b"", record()])  # an empty Example is valid protobuf
    assert out["dense"].shape == (2, 3) and not out["dense"].any()
    assert out["counts"].shape == (2, 4) and out["counts"].dtype == np.int64 and not out["counts"].any()


def test_feature_without_a_list_counts_as_absent(decoder):
    raw = record(ld(0x0A, ld(0x0A, b"label") + ld(0x12, b"")))  # Feature {} : no kind set
    dec = decoder(SPECS, ["label"])
    assert dec.decode_batch([raw])["label"].tolist() == [[0]] and dec.missing_counts["label"] == 1


@pytest.mark.parametrize(
    "feature, found",
    [
        (floats([1.0, 2.0]), 2),
        (floats([1.0, 2.0, 3.0, 4.0], packed=False), 4),
        (floats([]), 0),  # an empty list is present, with no values
        (ints([1, 2, 3]), 3),
        (ints([1, 2, 3, 4, 5], packed=False), 5),
        (ints([]), 0),
        (ints([2**40, -1, 7]), 3),
    ],
)
def test_wrong_length_names_feature_file_and_record(decoder, feature, found):
    name = "dense" if feature[0] == 0x12 else "counts"
    good = record(entry(name, floats([1, 2, 3]) if name == "dense" else ints([1, 2, 3, 4])))
    with pytest.raises(
        DataError,
        match=rf"^part-7\.gz: record 42: feature {name}: {found} values, "
        rf"the schema says {SPECS[name].length}$",
    ):
        decoder(SPECS, [name]).decode_batch(
            [good, good, record(entry(name, feature))], file="part-7.gz", first_index=40
        )


def test_wrong_kind_is_an_error(decoder):
    with pytest.raises(
        DataError,
        match=r"f\.gz: record 5: feature label holds a float_list, the schema says "
        r"int64_list",
    ):
        decoder().decode_batch([record(entry("label", floats([1.0])))], file="f.gz", first_index=5)


@pytest.mark.parametrize(
    "raw, problem",
    [
        (record(entry("label", ints([1])))[:-1], "not a tf.Example"),  # cut short
        (b"\x0a\x05\x0a\x03\x0a\x01", "not a tf.Example"),  # a length past the end
        (b"\x0b\x00", "not a tf.Example"),  # wire type 3 (groups)
        (record(entry("label", ld(0x1A, ld(0x0A, b"\x01\x80"))))[:], "ends inside a varint"),
        (record(entry("dense", ld(0x12, ld(0x0A, b"\x00" * 13)))), "13 bytes, not a whole number of floats"),
        (record(entry("label", ld(0x1A, ld(0x0A, b"\xff" * 11 + b"\x01")))), "ends inside a varint"),
    ],
)
def test_malformed_records_name_file_and_record(decoder, raw, problem):
    good = record(entry("label", ints([1])), entry("dense", floats([1, 2, 3])))
    with pytest.raises(DataError, match=rf"x\.gz: record 8: .*{problem}"):
        decoder(SPECS, ["label", "dense"]).decode_batch([good, raw, good], file="x.gz", first_index=7)


def test_protobuf_layouts_other_writers_may_use(decoder):
    value_first = ld(0x0A, ld(0x12, ints([5])) + ld(0x0A, b"label"))  # map entry: value before key
    split_list = entry(
        "counts", ld(0x1A, ld(0x0A, varint(1) + varint(2)) + b"\x08" + varint(3) + ld(0x0A, varint(2**50)))
    )  # packed, unpacked, packed chunks merge
    repeated_key = [entry("id", ints([1])), entry("id", ints([9]))]  # map semantics: the last one wins
    unknown = b"\x10\x07" + b"\x1d\x00\x00\x00\x00"  # unknown varint and fixed32 fields in Features
    raw = ld(0x0A, value_first + split_list + unknown + b"".join(repeated_key)) + b"\x10\x01"  # and Example
    usual = record(entry("label", ints([2])), *repeated_key)  # the usual layout, but a repeated key
    out = decoder().decode_batch([raw, usual])
    assert out["label"].tolist() == [[5], [2]]
    assert out["counts"].tolist() == [[1, 2, 3, 2**50], [0, 0, 0, 0]]
    assert out["id"].tolist() == [[9], [9]]


def test_compiled_path_takes_the_usual_layout_itself(monkeypatch):
    if decode._wire is None:
        pytest.skip("heavyranker.data.tf_example._wire is not built")

    def no_fallback(*args):
        raise AssertionError("the general parser was used")

    monkeypatch.setattr(decode, "_parse", no_fallback)
    rows = [{"dense": np.float32([1, 2, 3]), "counts": np.arange(4) * 1000, "label": [1], "id": [-3]}] * 5
    out = ExampleDecoder(SPECS, list(SPECS)).decode_batch([encode_example(r) for r in rows])
    assert out["counts"].tolist() == [[0, 1000, 2000, 3000]] * 5 and out["id"].tolist() == [[-3]] * 5


def test_unknown_wanted_feature():
    with pytest.raises(UserError, match="nope"):
        ExampleDecoder(SPECS, ["label", "nope"])


def test_empty_batch(decoder):
    out = decoder().decode_batch([])
    assert out["dense"].shape == (0, 3) and out["dense"].dtype == np.float32
    assert out["counts"].shape == (0, 4) and out["counts"].dtype == np.int64


# --- the encoder, against the same hand-built bytes ---


@pytest.mark.parametrize("packed", [True, False])
def test_encode_example_matches_hand_built_bytes(packed):
    features = {
        "dense": np.array([0.5, -1.0], dtype=np.float64),
        "counts": np.array([3, -1, 2**60]),
        "flag": np.array([True, False]),
        "tags": [b"x", "y"],
        "empty": np.zeros(0, np.float32),
    }
    expected = record(
        entry("dense", floats([0.5, -1.0], packed)),
        entry("counts", ints([3, -1, 2**60], packed)),
        entry("flag", ints([1, 0], packed)),
        entry("tags", strings([b"x", b"y"])),
        entry("empty", floats([], packed)),
    )
    assert encode_example(features, packed=packed) == expected


def test_encode_varints_matches_hand_encoding():
    values = [0, 1, 127, 128, 300, 2**31, 2**53 + 1, 2**63 - 1, -1, -(2**63), -300]
    assert encode_varints(np.array(values)) == b"".join(varint(v) for v in values)


def test_encode_tf_examples_matches_the_per_record_encoder():
    rng = np.random.default_rng(0)
    n = 50
    fixed = {
        "floats": rng.standard_normal((n, 7)).astype(np.float32),
        "label": rng.integers(0, 2, (n, 1)),
        "tokens": np.array([[b"ab", b"cd"]] * n, dtype=object),
    }
    ragged = {
        "ids": rng.integers(-(2**63), 2**63 - 1, (n, 1)),
        "counts": rng.integers(0, 1 << 20, (n, 3)),
        "big": np.full((n, 1), 2**53 + 1) + np.arange(n)[:, None] * (n % 3),
    }
    ragged["big"][0] = 0  # one row of another size
    records = encode_tf_examples({**dict(list(fixed.items())[:2]), **ragged, "tokens": fixed["tokens"]})
    for i, record in enumerate(records):
        expected = encode_example({name: values[i] for name, values in {**fixed, **ragged}.items()})
        assert record == expected, i


@pytest.mark.parametrize("packed", [True, False])
def test_round_trip_of_realistic_rows(decoder, packed):
    # Seed-like rows: heavy-tailed non-negative floats with many zeros, binary flags, small counts with a
    # few large ones, 62-bit ids, embeddings.
    rng = np.random.default_rng(7)
    shapes = {
        "cont": ("float_list", 60),
        "binary": ("int64_list", 40),
        "discrete": ("int64_list", 30),
        "emb": ("float_list", 8),
        "meta.id": ("int64_list", 1),
        "label": ("int64_list", 1),
    }
    specs = {name: FeatureSpec(name, dtype, length) for name, (dtype, length) in shapes.items()}
    n = 70
    columns = {
        "cont": (rng.lognormal(0, 2, (n, 60)) * (rng.random((n, 60)) < 0.4)).astype(np.float32),
        "binary": (rng.random((n, 40)) < 0.1).astype(np.int64),
        "discrete": np.where(
            rng.random((n, 30)) < 0.05, rng.integers(0, 2**40, (n, 30)), rng.integers(0, 20, (n, 30))
        ),
        "emb": rng.normal(size=(n, 8)).astype(np.float32),
        "meta.id": rng.integers(0, 2**62, (n, 1)),
        "label": (rng.random((n, 1)) < 0.3).astype(np.int64),
    }
    records = [encode_example({k: v[i] for k, v in columns.items()}, packed=packed) for i in range(n)]
    out = decoder(specs).decode_batch(records)
    for name, values in columns.items():
        assert out[name].dtype == values.dtype
        np.testing.assert_array_equal(out[name], values, err_msg=name)


def test_compiled_and_general_paths_agree_on_damaged_records(monkeypatch):
    # Random byte edits of valid records: the compiled path must give the general parser's values or
    # decline the record to it (then the same error), and never read out of bounds.
    if decode._wire is None:
        pytest.skip("heavyranker.data.tf_example._wire is not built")
    fast = ExampleDecoder(SPECS, list(SPECS))
    with monkeypatch.context() as patch:
        patch.setattr(decode, "_wire", None)
        general = ExampleDecoder(SPECS, list(SPECS))  # decides at construction: the general parser only
    values = {"dense": np.float32([1, 2, 3]), "counts": [1, 300, -1, 2**40], "label": [1], "other": [5, 6]}
    good = [encode_example(values, packed=packed) for packed in (True, False)]
    rng = np.random.default_rng(3)
    outcomes = set()
    for i in range(3000):
        damaged = bytearray(good[i % 2])
        for _ in range(rng.integers(1, 4)):
            at = int(rng.integers(0, len(damaged)))
            match rng.integers(0, 3):
                case 0:
                    damaged[at] = int(rng.integers(0, 256))
                case 1:
                    del damaged[at : at + int(rng.integers(1, 5))]
                case 2:
                    damaged[at:at] = rng.integers(0, 256, int(rng.integers(1, 4)), dtype=np.uint8).tobytes()
        results = []
        for decoder in (fast, general):
            try:
                out = decoder.decode_batch([good[0], bytes(damaged), good[1]])
                results.append({name: column.tobytes() for name, column in out.items()})  # NaN == NaN
            except DataError as e:
                results.append(str(e))
        assert results[0] == results[1], bytes(damaged).hex()
        outcomes.add(type(results[0]))
    assert outcomes == {dict, str}  # both decoded and refused records were met
