"""The request parser on bodies written by hand, as a hostile client would: keys given twice (also where an
escaped ':' would hide one from the count), ids too long or too large, long text the messages must not
repeat whole, and JSON too deep or numbers too large. Two made-up inputs; no model needed."""

from __future__ import annotations

import json

import pytest
import torch

from heavyranker.serve.request import BadRequest, parse_candidates
from heavyranker.serve.scorer import InputSpec

INPUTS = [InputSpec("a", (2,), torch.float32, False), InputSpec("n", (), torch.int64, False)]
FEATURES = '{"a": [0.5, 1], "n": 3}'


def document(*candidates: str) -> bytes:
    return ('{"candidates": [' + ", ".join(candidates) + "]}").encode()


def candidate(cid: str, features: str = FEATURES) -> str:
    return f'{{"id": {cid}, "features": {features}}}'


def refusal(body: bytes) -> tuple[int, str]:
    with pytest.raises(BadRequest) as error:
        parse_candidates(body, INPUTS, 10)
    return error.value.status, str(error.value)


TWICE = "given twice (a key may appear once in an object)"


@pytest.mark.parametrize(
    "body, message",
    [
        (b'{"candidates": [], "candidates": []}', f"candidates: {TWICE}"),
        (
            document(candidate('"c0"'), '{"id": "x", "id": "c1", "features": ' + FEATURES + "}"),
            f"candidates[1] (id 'c1'): id: {TWICE}",
        ),
        (  # the key written with an escape is the same key
            document(candidate('"c0"'), candidate('"c1"', '{"a": [0, 0], "n": 1, "\\u0061": [0.5, 1]}')),
            f"candidates[1] (id 'c1'): features.a: {TWICE}",
        ),
        (  # an escaped ':' in the id makes the text's count of ':' come out even
            document(candidate('"x\\u003a"', '{"a": [1, 2], "n": 1, "n": 2}')),
            f"candidates[0] (id 'x:'): features.n: {TWICE}",
        ),
    ],
    ids=["candidates", "id", "escaped key", "escaped colon"],
)
def test_a_key_given_twice_is_a_422_naming_where(body: bytes, message: str):
    assert refusal(body) == (422, message)


def test_colons_in_ids_are_not_taken_for_keys():
    ids, arrays = parse_candidates(document(candidate('"urn:tweet:1"'), candidate('"a\\u003ab"')), INPUTS, 10)
    assert ids == ["urn:tweet:1", "a:b"]
    assert arrays["n"].tolist() == [3, 3]


@pytest.mark.parametrize("cid", ['"' + "x" * 256 + '"', str(2**64 - 1), str(-(2**63))])
def test_ids_up_to_256_characters_or_64_bits(cid: str):
    assert parse_candidates(document(candidate(cid)), INPUTS, 10)[0] == [json.loads(cid)]


@pytest.mark.parametrize(
    "cid, message",
    [
        ('"' + "x" * 257 + '"', "257 characters, at most 256"),
        (str(2**64), f"{2**64} does not fit in 64 bits (signed or unsigned)"),
        (str(-(2**63) - 1), f"{-(2**63) - 1} does not fit in 64 bits (signed or unsigned)"),
        ("9" * 4000, "9" * 64 + "... does not fit in 64 bits (signed or unsigned)"),
    ],
)
def test_longer_or_larger_ids_are_a_422(cid: str, message: str):
    assert refusal(document(candidate(cid))) == (422, f"candidates[0]: id: {message}")


@pytest.mark.parametrize(
    "body, message",
    [
        (
            document('{"id": 1, "features": ' + FEATURES + ', "' + "k" * 10_000 + '": 1}'),
            "candidates[0] (id 1): " + "k" * 64 + "...: unknown field (a candidate has id and features)",
        ),
        (
            document(candidate("1", '{"a": [0, 1], "n": ' + "7" * 4000 + "}")),
            "candidates[0] (id 1): features.n: " + "7" * 64 + "... is outside the range of int64",
        ),
    ],
    ids=["key", "integer"],
)
def test_a_message_repeats_only_the_start_of_long_text(body: bytes, message: str):
    assert refusal(body) == (422, message)


@pytest.mark.parametrize(
    "body, status, message",
    [
        (
            b'{"candidates": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
            400,
            "the body is not valid JSON: recursion",
        ),
        (
            document(candidate("1", '{"a": [1e999, 0], "n": 1}')),
            422,
            "candidates[0] (id 1): features.a[0]: inf:",
        ),
        (
            document(candidate("1", '{"a": [' + "[" * 100 + "0" + "]" * 100 + ', 0], "n": 1}')),
            422,
            "candidates[0] (id 1): features.a[0]: a list is not a number",
        ),
    ],
    ids=["deep document", "1e999", "deep value"],
)
def test_deep_json_and_huge_numbers_are_a_4xx(body: bytes, status: int, message: str):
    got_status, got_message = refusal(body)
    assert got_status == status and got_message.startswith(message), got_message
