"""What one request may take of the server before it is parsed: its content type, its size, how long its
head and body may take to arrive, and a place among the requests admitted at once.

Requests beyond those in the model's forward wait, each holding its body and then its parsed values.
Without a bound, a burst queued them all behind the model, each waiting for every forward ahead of it and
holding its memory meanwhile (bench/serve_latency.py measures the forwards and the bodies' sizes;
bench/results/serve_latency.json has the figures). A request is admitted before its body is read, so that
a refused one costs nothing, and counts until it is scored, so that the bodies and parsed values held at
once are bounded too. The bounds are settings, with their defaults and reasons: config.serving.ServeOptions
(max_queue, read_timeout).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from http import HTTPStatus

import h11
from fastapi import HTTPException, Request
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

RETRY_AFTER_S = 1  # the queue drains by one forward at a time; the header counts whole seconds
# A length in a header: ASCII digits only (RFC 9110's 1*DIGIT). str.isdigit() also takes '²' and '¹',
# which int() refuses, and int() refuses more than 4,300 digits; 18 digits hold any body's length.
HEADER_NUMBER = re.compile(r"[0-9]{1,18}")
# A request's line and headers, as h11 counts them (uvicorn's h11_max_incomplete_event_size, h11's default):
# while they are incomplete. The clients this serves send a few hundred bytes.
MAX_HEAD_BYTES = 16 * 1024
SHOWN_CHARS = 120  # of h11's account of a malformed head, which quotes what was sent


class RequestLimits:
    """`async with limits.admit(request, content_types) as body:` admits the request and reads its body, or
    refuses it with an HTTPException (415, 413, 503, 408) and the headers it needs.

    At most 1 + max_queue requests are admitted at once: reading their body, being parsed, waiting for the
    model or in its forward. Only the event loop touches the count, so it needs no lock."""

    def __init__(self, *, max_body_bytes: int, max_queue: int, read_timeout_s: float):
        self.max_body_bytes = max_body_bytes
        self.max_queue = max_queue
        self.read_timeout_s = read_timeout_s
        self.admitted = 0

    @asynccontextmanager
    async def admit(
        self, request: Request, content_types: Collection[str | None]
    ) -> AsyncIterator[bytearray]:
        """`content_types`: the media types the route reads; None among them accepts a body without one."""
        require_content_type(request, content_types)
        self._check_declared_length(request)
        if self.admitted > self.max_queue:
            raise HTTPException(
                503,
                f"the server is busy: {1 + self.max_queue} requests in progress, the most it takes; "
                f"retry in {RETRY_AFTER_S} s",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self.admitted += 1
        try:
            yield await self._read(request)
        finally:
            self.admitted -= 1

    def _check_declared_length(self, request: Request) -> None:
        length = request.headers.get("content-length", "")
        declared = header_number(length)
        # 19 or 20 digits (h11 refuses more): beyond any body, not a reason to wait for one.
        beyond = declared is None and length.isascii() and length.isdigit()
        if beyond or (declared is not None and declared > self.max_body_bytes):
            raise HTTPException(
                413, f"the body is {length} bytes, at most {self.max_body_bytes} are accepted"
            )

    async def _read(self, request: Request) -> bytearray:
        try:
            return await asyncio.wait_for(self._receive(request), self.read_timeout_s)
        except ClientDisconnect:  # unhandled, it is a traceback in the log for each client that gives up
            raise HTTPException(400, "the connection closed before the body's end") from None
        except TimeoutError:
            # The rest of the body may never come: close the connection rather than wait to drain it.
            raise HTTPException(
                408,
                f"the body did not arrive within {self.read_timeout_s:g} s",
                headers={"Connection": "close"},
            ) from None

    async def _receive(self, request: Request) -> bytearray:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise HTTPException(413, f"the body is over {self.max_body_bytes} bytes, the most accepted")
        return body


def header_number(value: str) -> int | None:
    """The number a header's value gives in ASCII decimal digits, or None if it is not one."""
    return int(value) if HEADER_NUMBER.fullmatch(value) else None


def require_content_type(request: Request, accepted: Collection[str | None]) -> None:
    """415 unless the body's media type is one the route reads. Read whatever its type, a body could come
    from a page in a browser on another origin: a form's types make a "simple request", sent without asking
    this service. Parameters are ignored: JSON is UTF-8, and application/json defines none (RFC 8259)."""
    if media_type(request) not in accepted:
        named = " or ".join(t for t in accepted if t is not None)
        given = request.headers.get("content-type") or "none"
        raise HTTPException(415, f"the body must be sent as content-type {named}, not {given}")


def media_type(request: Request) -> str | None:
    """The request's content type without its parameters, lowercase; None if it has none."""
    given = request.headers.get("content-type")
    return given.partition(";")[0].strip().lower() if given is not None else None


def h11_with_deadline(timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection on which the app has no request for timeout_s seconds.

    uvicorn times a connection only from a response to the next byte (its keep-alive timeout): one that
    sent nothing, part of a request head, or the body of a request already answered (415, 503) stayed
    open as long as the client kept sending a byte now and then. Once a request reached the app,
    RequestLimits times its body."""

    class Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            if self._deadline is not None:
                self._deadline.cancel()

        def send_400_response(self, msg: str) -> None:
            """uvicorn's answer to bytes h11 cannot take as a request, in this server's error body: JSON
            naming what h11 found, with its status (431 for a head too long), not text/plain "Invalid HTTP
            request received."."""
            error = sys.exc_info()[1]  # uvicorn calls this in its `except h11.RemoteProtocolError:`
            status = getattr(error, "error_status_hint", 400)
            if status == 431:
                problem = f"the request line and headers are too long (more than {MAX_HEAD_BYTES} bytes)"
            else:
                problem = f"not an HTTP/1.1 request: {str(error or msg)[:SHOWN_CHARS]}"
            body = json.dumps({"detail": problem}).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ]
            response = h11.Response(status_code=status, headers=headers, reason=HTTPStatus(status).phrase)
            for event in (response, h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(timeout_s, self._close_unless_busy)

        def _close_unless_busy(self) -> None:
            if self.cycle is None or self.cycle.response_complete:
                self.timeout_keep_alive_handler()  # uvicorn's own close of an idle connection

    return Protocol
