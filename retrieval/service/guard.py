"""ASGI middleware in front of every request: body size limit while streaming, request
timeout, and per-route statistics."""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from retrieval.service.stats import ServiceStats


async def send_json(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """Refuses bodies over ``max_body_bytes`` with 413: at once when ``Content-Length`` says
    so, otherwise as soon as the streamed body passes the limit (the rest is never read);
    answers 504 when a request takes over ``timeout_s``; records every request's route,
    status and latency in ``stats``."""

    def __init__(
        self, app: ASGIApp, max_body_bytes: int, timeout_s: float, stats: ServiceStats
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.timeout_s = timeout_s
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state: dict[str, Any] = {"status": 500, "started": False, "too_large": False}
        limit = self.max_body_bytes
        too_large = f"the request body is over the limit of {limit} bytes"
        try:
            declared = _content_length(scope)
            if declared is not None and declared > limit:
                state["status"] = 413
                await send_json(send, 413, too_large)
                return
            received = 0

            async def guarded_receive() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        state["too_large"] = True
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
                with anyio.fail_after(self.timeout_s):
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
