"""The seg-dense schema file: what load_schema refuses, in one line naming the file and the feature."""

from __future__ import annotations

import json

import pytest

from heavyranker.schema import FeatureSpec, SchemaError, load_schema


def write(tmp_path, entries) -> str:
    path = tmp_path / "schema.json"
    path.write_text(json.dumps({"schema": entries}))
    return str(path)


def test_a_schema_reads_back_in_file_order(tmp_path):
    path = write(
        tmp_path,
        [
            {"feature_name": "b", "dtype": "float_list", "length": 3},
            {"feature_name": "a", "dtype": "int64_list", "length": 1},
        ],
    )
    assert list(load_schema(path).values()) == [
        FeatureSpec("b", "float_list", 3),
        FeatureSpec("a", "int64_list", 1),
    ]


def test_a_feature_named_twice_is_one_error(tmp_path):
    # A dict keeps the last of two entries: the first's length and dtype would be dropped without a word.
    path = write(
        tmp_path,
        [
            {"feature_name": "x", "dtype": "float_list", "length": 3},
            {"feature_name": "x", "dtype": "int64_list", "length": 1},
        ],
    )
    with pytest.raises(SchemaError, match=r"schema\.json: feature x is named twice"):
        load_schema(path)


@pytest.mark.parametrize("length", [2.5, "3", True, None, "\u0663"])
def test_a_length_that_is_no_whole_number_is_one_error(tmp_path, length):
    # int() turned 2.5 into 2, "3" and "\u0663" (an Arabic-Indic 3) into 3, true into 1.
    path = write(tmp_path, [{"feature_name": "x", "dtype": "float_list", "length": length}])
    with pytest.raises(SchemaError, match=r"schema\.json: feature x: length must be a whole number"):
        load_schema(path)


@pytest.mark.parametrize("name", [5, None, "", ["x"]])
def test_a_name_that_is_no_text_is_one_error(tmp_path, name):
    path = write(tmp_path, [{"feature_name": name, "dtype": "float_list", "length": 1}])
    with pytest.raises(SchemaError, match=r"schema\.json: feature_name .* is not a non-empty string"):
        load_schema(path)


@pytest.mark.parametrize(
    "content", ["[]", '{"schema": {"x": 1}}', '{"schema": "x"}', "\xff", '{"schema": [5]}']
)
def test_a_file_that_is_no_schema_is_one_error(tmp_path, content):
    path = tmp_path / "schema.json"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(SchemaError, match=r"schema\.json: not a schema"):
        load_schema(str(path))


def test_a_negative_length_is_one_error(tmp_path):
    path = write(tmp_path, [{"feature_name": "x", "dtype": "float_list", "length": -1}])
    with pytest.raises(SchemaError, match=r"feature x: length must be positive, got -1"):
        load_schema(path)
