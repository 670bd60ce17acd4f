"""Inference-Header-Content-Length, whatever a client writes in it, on both routes that read it (binary
/v1/rank and /v2 infer) of a real server: never a 5xx. Values crafted where str.isdigit() and int()
disagree (superscript digits, other scripts' digits), signs, spaces, numbers beyond int()'s 4,300 digits,
nothing at all, and a few hundred drawn at random from those characters (seeded). The reference is HTTP's
own rule: ASCII digits (RFC 9110's 1*DIGIT), the header's surrounding spaces and tabs not being part of
the value; a value that is the JSON header's true length is scored (200), any other is a 400."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from heavyranker.serve.app import create_app
from heavyranker.serve.limits import header_number
from tests.serve.conftest import SHAPES, Exported, binary_request, random_features, serving, tensors
from tests.serve.test_limits import exchange

NAME = "ranker"
DIGIT_LIKE = "²³¹٣５५"  # str.isdigit() says yes to each; int() refuses the first three, takes the others
ALPHABET = "0123456789 \t+-._xeE" + DIGIT_LIKE + "¼½é"


def crafted(length: int) -> list[str]:
    exact = str(length)
    return [
        exact,
        "0" + exact,
        " " + exact + "\t",
        "+" + exact,
        "-" + exact,
        exact + ".0",
        exact[:-1] + "²",
        "²",
        "¹",
        "³" + exact,
        "٣",
        "５",
        "５" * len(exact),
        "1_0",
        "0x1f",
        "1e3",
        "",
        " ",
        "-0",
        "9" * 18,
        "9" * 19,
        "9" * 5000,
        "1" + "0" * 4400,
        exact + " " + exact,
    ]


def drawn(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(ALPHABET, k=rng.randint(0, 12))) for _ in range(count)]


def encoded(value: str) -> bytes:
    """As a client sends it: Latin-1 where it can (the server reads header bytes as Latin-1, so '²' arrives
    as '²'), else UTF-8 (arriving as other Latin-1 characters). Sent on a socket by hand: HTTP clients
    refuse to send some of these values (surrounding spaces)."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode()


def expected_status(value: str, length: int) -> int:
    received = encoded(value).decode("latin-1").strip(" \t")
    ascii_digits = received != "" and all(c in "0123456789" for c in received)
    return 200 if ascii_digits and received.lstrip("0") == str(length) else 400  # length > 0


@pytest.fixture(scope="module")
def url(exported: Exported) -> Iterator[str]:
    with serving(create_app(exported.folder, model_name=NAME)) as base:
        yield base


@pytest.mark.parametrize(
    "path, header_keys", [("/v1/rank", {"ids": [7]}), (f"/v2/models/{NAME}/infer", {})], ids=["v1", "v2"]
)
def test_no_header_length_is_a_5xx(url: str, path: str, header_keys: dict):
    described, data = tensors(random_features(SHAPES, 1), binary=True)
    content, headers = binary_request({**header_keys, "inputs": described}, data)
    length = int(headers.pop("inference-header-content-length"))
    answered = {value: status(url, path, content, encoded(value)) for value in crafted(length) + drawn(300)}
    assert answered[str(length)] == 200  # the values are read at all
    wrong = {v: s for v, s in answered.items() if s != expected_status(v, length)}
    assert not wrong, {v[:40]: s for v, s in wrong.items()}


def status(url: str, path: str, content: bytes, header_length: bytes) -> int:
    """The status of one binary request whose Inference-Header-Content-Length is `header_length`, raw."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {len(content)}\r\nConnection: close\r\n"
    ).encode()
    head += b"Inference-Header-Content-Length: " + header_length + b"\r\n\r\n"
    response, closed = exchange(url, head + content, 60)
    assert closed and response.startswith(b"HTTP/1.1 "), response[:100]
    return int(response[9:12])


@pytest.mark.parametrize(
    "value, number",
    [
        ("0", 0),
        ("0042", 42),
        ("9" * 18, 10**18 - 1),
        ("9" * 19, None),
        ("²", None),
        ("٣", None),
        ("５", None),
        ("+1", None),
        ("-1", None),
        (" 1", None),
        ("", None),
        ("1\n", None),
    ],
)
def test_a_header_number_is_ascii_digits_only(value: str, number: int | None):
    assert header_number(value) == number
