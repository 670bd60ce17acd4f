"""What a request may take of the server before it is parsed, through a real uvicorn server: its content
type (415), its place among the requests admitted at once (503 with Retry-After beyond the queue), and the
time its head and body may take to arrive (408 for a body; the connection closes). No assertion depends
on timing: the model is held on an Event, and every wait is a bounded loop that fails when its generous
bound passes."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi import FastAPI, HTTPException, Request

from heavyranker.serve.app import create_app
from heavyranker.serve.limits import MAX_HEAD_BYTES, RequestLimits
from tests.serve.conftest import Exported, serving

QUEUE = 2
READ_TIMEOUT = 0.5
BOUND_S = 60  # for what must happen, so that a loaded machine is never a failure


@pytest.fixture(scope="module")
def served(exported: Exported) -> Iterator[tuple[FastAPI, str]]:
    app = create_app(exported.folder, max_queue=QUEUE, read_timeout=READ_TIMEOUT)
    with serving(app) as url:
        yield app, url


def request_body(app: FastAPI, n: int, first_id: int = 0) -> bytes:
    """n valid candidates with ids first_id, first_id + 1, ...: every value 0.5, every flag (binary) 1."""
    inputs = app.state.versions.current.scorer.inputs
    features = {spec.name: [1 if spec.name == "binary" else 0.5] * spec.width for spec in inputs}
    return json.dumps({"candidates": [{"id": first_id + i, "features": features} for i in range(n)]}).encode()


def post(url: str, content: bytes, content_type: str | None = "application/json") -> httpx.Response:
    headers = {"content-type": content_type} if content_type else {}
    return httpx.post(f"{url}/v1/rank", content=content, headers=headers, timeout=BOUND_S)


def exchange(url: str, data: bytes, bound_s: float) -> tuple[bytes, bool]:
    """Sends `data` on a new connection and reads until the server closes it or bound_s pass: (what came
    back, whether the server closed the connection)."""
    address = urlsplit(url)
    received = b""
    with socket.create_connection((address.hostname, address.port), timeout=bound_s) as sock:
        sock.sendall(data)
        deadline = time.monotonic() + bound_s
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                return received, True
            if not chunk:
                return received, True
            received += chunk
    return received, False


def head(content_length: int, *extra: str) -> bytes:
    lines = ["POST /v1/rank HTTP/1.1", "Host: test", "Content-Type: application/json"]
    lines += [f"Content-Length: {content_length}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND_S
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"]
)
def test_json_is_read(served, content_type: str):
    app, url = served
    response = post(url, request_body(app, 2), content_type)
    assert response.status_code == 200, response.text
    assert sorted(c["id"] for c in response.json()["candidates"]) == [0, 1]


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
    ],
)
def test_any_other_content_type_is_a_415(served, content_type: str | None):
    # A form's content types are what a page on another origin may send without a CORS preflight.
    app, url = served
    response = post(url, request_body(app, 2), content_type)
    assert response.status_code == 415
    accepted = "application/json or application/octet-stream"
    expected = f"the body must be sent as content-type {accepted}, not {content_type or 'none'}"
    assert response.json() == {"detail": expected}


@contextmanager
def held_model(scorer) -> Iterator[tuple[threading.Event, threading.Event]]:
    """The scorer's model busy until the test releases it: (entered, set as a request reaches it; release)."""
    forward, entered, release = scorer.program, threading.Event(), threading.Event()

    def held(*inputs):
        entered.set()
        release.wait(BOUND_S)
        return forward(*inputs)

    scorer.program = held
    try:
        yield entered, release
    finally:
        release.set()
        scorer.program = forward


def test_beyond_the_queue_a_request_is_a_503_with_retry_after_and_the_queued_ones_are_scored(served):
    app, url = served
    limits = app.state.limits
    with held_model(app.state.versions.current.scorer) as (entered, release):
        with ThreadPoolExecutor(1 + QUEUE) as pool:
            scored = pool.submit(post, url, request_body(app, 1, first_id=0))
            assert entered.wait(BOUND_S), "the first request did not reach the model"
            queued = [pool.submit(post, url, request_body(app, 2, first_id=10 * i)) for i in (1, 2)]
            wait_until(lambda: limits.admitted == 1 + QUEUE, "the queue did not fill")
            refused = post(url, request_body(app, 1))
            # Refused before its body is read: the head alone gets the 503 (read first, it would be a 408).
            early, closed = exchange(url, head(10**6, "Connection: close"), BOUND_S)
            release.set()
            answers = [future.result(BOUND_S) for future in [scored, *queued]]
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json() == {
        "detail": f"the server is busy: {1 + QUEUE} requests in progress, the most it takes; retry in 1 s"
    }
    assert early.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1\r\n" in early.lower() and closed
    assert [a.status_code for a in answers] == [200] * (1 + QUEUE)
    ids = [sorted(c["id"] for c in a.json()["candidates"]) for a in answers]
    assert ids == [[0], [10, 11], [20, 21]]
    assert limits.admitted == 0
    assert post(url, request_body(app, 1)).status_code == 200


def test_a_body_that_stops_half_way_is_a_408_and_the_connection_closes(served):
    app, url = served
    content = request_body(app, 2)
    # Keep-alive (HTTP/1.1's default): only the server's timeout can end this connection.
    response, closed = exchange(url, head(len(content)) + content[: len(content) // 2], 10 * READ_TIMEOUT)
    assert closed, "the connection was still open at 10x the read timeout"
    status, _, content = response.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 408 ")
    assert json.loads(content) == {"detail": f"the body did not arrive within {READ_TIMEOUT} s"}
    assert app.state.limits.admitted == 0  # its place in the queue is free again


@pytest.mark.parametrize(
    "sent", [b"", b"POST /v1/rank HTTP/1.1\r\nHost: test\r\nContent-Le"], ids=["nothing", "half a head"]
)
def test_a_connection_without_a_whole_request_head_closes(served, sent: bytes):
    # Before a request reaches the app, uvicorn alone would hold this connection as long as the client liked.
    _, url = served
    assert exchange(url, sent, 10 * READ_TIMEOUT) == (b"", True), "still open at 10x the read timeout"


@pytest.mark.parametrize(
    "sent, status, detail",
    [
        (
            # Beyond what one read takes (asyncio's 256 KiB): h11 counts a head while it is incomplete.
            head(2, "X-Padding: " + "a" * 20 * MAX_HEAD_BYTES) + b"{}",
            b"431 Request Header Fields Too Large",
            f"the request line and headers are too long (more than {MAX_HEAD_BYTES} bytes)",
        ),
        (head(2, "Content-Length: 3") + b"{}", b"400 Bad Request", "not an HTTP/1.1 request: "
         "conflicting Content-Length headers"),
        (b"\x00\x01 /v1/rank HTTP/1.1\r\n\r\n", b"400 Bad Request", "not an HTTP/1.1 request: illegal "
         "request line"),
    ],
    ids=["head too long", "two lengths", "not http"],
)  # fmt: skip
def test_a_request_http_cannot_parse_is_answered_in_json_and_closed(served, sent, status, detail):
    # uvicorn answered text/plain "Invalid HTTP request received." whatever was wrong.
    _, url = served
    response, closed = exchange(url, sent, BOUND_S)
    assert closed
    head_sent, _, content = response.partition(b"\r\n\r\n")
    assert head_sent.startswith(b"HTTP/1.1 " + status + b"\r\n")
    assert b"content-type: application/json" in head_sent.lower()
    assert json.loads(content)["detail"].startswith(detail)


@pytest.mark.parametrize("length", ["9" * 19, "1" + "0" * 19])
def test_a_length_beyond_any_number_of_18_digits_is_a_413_before_the_body(served, length: str):
    # It was read as no length: the server waited for the body until the read timeout, then answered 408.
    _, url = served
    response, _ = exchange(
        url, head(0).replace(b"Content-Length: 0", f"Content-Length: {length}".encode()), BOUND_S
    )
    status, _, content = response.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 413 "), status
    assert json.loads(content)["detail"].startswith(f"the body is {length} bytes, at most ")


def test_a_client_that_leaves_during_its_body_is_a_400_not_a_traceback():
    limits = RequestLimits(max_body_bytes=1000, max_queue=QUEUE, read_timeout_s=BOUND_S)
    messages = iter(
        [{"type": "http.request", "body": b'{"cand', "more_body": True}, {"type": "http.disconnect"}]
    )

    async def receive() -> dict:
        return next(messages)

    async def read() -> None:
        scope = {"type": "http", "method": "POST", "headers": [(b"content-type", b"application/json")]}
        async with limits.admit(Request(scope, receive), ["application/json"]):
            pass

    with pytest.raises(HTTPException) as refused:
        asyncio.run(read())
    assert (refused.value.status_code, refused.value.detail) == (
        400,
        "the connection closed before the body's end",
    )
    assert limits.admitted == 0
