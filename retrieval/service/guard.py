"""ASGI middleware in front of every request: body size limit while streaming, a bound on the
uploads in the server, the request's deadline, and per-route statistics.

A request refused early (413, 503) while its client is still sending has the rest of its body
read and discarded first, when its ``Content-Length`` says it ends within ``DRAIN_BYTES`` past
the limit (a streamed body of unknown length: a quarter of that), within ``DRAIN_S`` seconds:
a client that only reads the answer once it has sent everything (Python's urllib, many
others) then sees the status instead of a broken pipe. Longer bodies are cut off.
"""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from retrieval.service.budget import Deadline
from retrieval.service.stats import ServiceStats

DRAIN_BYTES = 4 * 1024 * 1024
DRAIN_S = 5.0
#: Routes whose requests carry uploads (bounded by ``max_requests``)
UPLOAD_ROUTES = {("POST", "/search"), ("POST", "/items")}


async def send_json(
    send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def drain(receive: Receive, budget: int) -> bool:
    """Read and discard the rest of a request body, at most ``budget`` bytes and ``DRAIN_S``
    seconds; True when the body ended within them."""
    with anyio.move_on_after(DRAIN_S):
        while budget >= 0:
            message = await receive()
            if message["type"] != "http.request":
                return False
            budget -= len(message.get("body", b""))
            if not message.get("more_body", False):
                return budget >= 0
    return False


class RequestGuard:
    """Refuses bodies over ``max_body_bytes`` with 413: at once when ``Content-Length`` says
    so, otherwise as soon as the streamed body passes the limit (the rest is discarded, see
    :func:`drain`, never kept); refuses an upload with 503 + ``Retry-After`` while
    ``max_requests`` are in the server; gives each request a :class:`Deadline`
    (``scope["state"]["deadline"]``) and answers 504 when it takes over ``timeout_s``;
    records every request's route, status and latency in ``stats``."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        timeout_s: float,
        stats: ServiceStats,
        max_requests: int = 32,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.timeout_s = timeout_s
        self.stats = stats
        self.max_requests = max_requests
        self.uploads_in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        deadline = Deadline.after(self.timeout_s)
        scope.setdefault("state", {})["deadline"] = deadline
        state: dict[str, Any] = {"status": 500, "started": False, "too_large": False}
        limit = self.max_body_bytes
        too_large = f"the request body is over the limit of {limit} bytes"
        upload = (scope.get("method"), scope.get("path")) in UPLOAD_ROUTES
        try:
            declared = _content_length(scope)
            if declared is not None and declared > limit:
                state["status"] = 413
                if declared <= limit + DRAIN_BYTES:
                    await drain(receive, declared)
                await send_json(send, 413, too_large)
                return
            if upload and self.uploads_in_flight >= self.max_requests:
                state["status"] = 503
                await drain(receive, limit + DRAIN_BYTES)
                detail = f"the server is busy ({self.max_requests} uploads in progress)"
                await send_json(send, 503, detail, [(b"retry-after", b"1")])
                return
            self.uploads_in_flight += upload
            received = 0

            async def guarded_receive() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        state["too_large"] = True
                        if message.get("more_body", False):  # what is left, if known
                            rest = DRAIN_BYTES // 4 if declared is None else declared - received
                            await drain(receive, min(DRAIN_BYTES, rest))
                        raise HTTPException(413, too_large)
                return message

            async def guarded_send(message: Message) -> None:
                if state["too_large"]:  # whatever the app made of a cut-off body
                    if message["type"] == "http.response.start" and not state["started"]:
                        state["started"], state["status"] = True, 413
                        await send_json(send, 413, too_large)
                    return
                if message["type"] == "http.response.start":
                    state["started"], state["status"] = True, message["status"]
                await send(message)

            try:
                with anyio.fail_after(max(0.0, deadline.left())):
                    await self.app(scope, guarded_receive, guarded_send)
            except TimeoutError:
                if not state["started"]:
                    state["status"] = 504
                    await send_json(send, 504, f"the request took over {self.timeout_s:g} s")
            except HTTPException as err:
                if err.status_code != 413 or state["started"]:
                    raise
                state["started"], state["status"] = True, 413
                await send_json(send, 413, too_large)
            finally:
                self.uploads_in_flight -= upload
        finally:
            route = getattr(scope.get("route"), "path", None) or _fallback_route(scope)
            self.stats.record(route, int(state["status"]), time.perf_counter() - start)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _fallback_route(scope: Scope) -> str:
    """Routes the app did not match are counted together (raw paths would grow the table)."""
    path = scope.get("path", "")
    return "/static/*" if path.startswith("/static/") else "(unmatched)"
