"""ASGI middleware in front of every request: the body's size limit and minimum rate while it
streams, bounds on the uploads in the server, the request's deadline, and per-route
statistics.

Uploads are counted in two stages (:class:`UploadSlots`): while their body arrives, and once
it is whole until they are answered; only the second stage is bounded by ``max_requests``, the
work and memory of the service. A body must keep a minimum rate after a grace period (408
else), so a client that trickles its body holds a receiving slot for seconds, and never one of
``max_requests``.

A request refused early (413, 503) while its client is still sending has the rest of its body
read and discarded first, when its ``Content-Length`` says it ends within ``DRAIN_BYTES`` past
the limit (a streamed body of unknown length: a quarter of that), within ``DRAIN_S`` seconds:
a client that only reads the answer once it has sent everything (Python's urllib, many
others) then sees the status instead of a broken pipe. Longer bodies are cut off.

Request counts and latency percentiles per route, for ``GET /stats``.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, deque
from typing import Any, NoReturn

import anyio
import numpy as np
from starlette.exceptions import HTTPException
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from retrieval.service.budget import Deadline

DRAIN_BYTES = 4 * 1024 * 1024


DRAIN_S = 5.0


#: Routes whose requests carry uploads (bounded by :class:`UploadSlots`)
UPLOAD_ROUTES = {("POST", "/search"), ("POST", "/items")}


RETRY = [(b"retry-after", b"1")]


Headers = list[tuple[bytes, bytes]]


async def send_json(send: Send, status: int, detail: str, headers: Headers | None = None) -> None:
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


class UploadSlots:
    """The uploads in the server: ``receiving`` (bodies still arriving, at most
    ``max_receiving``) and ``in_flight`` (received whole and not yet answered, at most
    ``max_requests``); ``refused`` counts the 503s. Used from the event loop only."""

    def __init__(self, max_requests: int, max_receiving: int) -> None:
        self.max_requests, self.max_receiving = max_requests, max_receiving
        self.counts = {"receiving": 0, "in_flight": 0}
        self.refused = 0

    def full(self, stage: str) -> str | None:
        """Why no upload may enter ``stage`` (``receiving`` or ``in_flight``) now; None when
        one may."""
        if stage == "in_flight":
            limit, what = self.max_requests, "uploads in progress"
        else:
            limit, what = self.max_receiving, "uploads arriving"
        if self.counts[stage] >= limit:
            return f"the server is busy ({self.counts[stage]} {what})"
        return None

    def busy(self) -> str | None:
        """Why an upload arriving now is refused; None when it may start receiving."""
        return self.full("in_flight") or self.full("receiving")

    def move(self, held: str | None, wanted: str | None) -> None:
        """Give back the slot ``held`` (if any) and take one of ``wanted`` (if any)."""
        if held is not None:
            self.counts[held] -= 1
        if wanted is not None:
            self.counts[wanted] += 1

    def snapshot(self) -> dict[str, int]:
        return {
            **self.counts,
            "max_receiving": self.max_receiving,
            "max_requests": self.max_requests,
            "refused": self.refused,
        }


class RequestGuard:
    """Refuses bodies over ``max_body_bytes`` with 413: at once when ``Content-Length`` says
    so, otherwise as soon as the streamed body passes the limit (the rest is discarded, see
    :func:`drain`, never kept); refuses with 408 a body that arrives slower than
    ``body_min_rate`` bytes/s after ``body_grace_s``; refuses an upload with 503 +
    ``Retry-After`` when ``slots`` are full (see :class:`UploadSlots`); gives each request a
    :class:`Deadline` (``scope["state"]["deadline"]``) and answers 504 when it takes over
    ``timeout_s``; records every request's route, status and latency in ``stats``."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        timeout_s: float,
        stats: ServiceStats,
        slots: UploadSlots,
        body_grace_s: float = 5.0,
        body_min_rate: float = 32 * 1024,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.timeout_s = timeout_s
        self.stats = stats
        self.slots = slots
        self.body_grace_s, self.body_min_rate = body_grace_s, body_min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        exchange = _Exchange(self, scope, receive, send)
        try:
            await exchange.run()
        finally:
            self.stats.record(route_of(scope), exchange.status, time.perf_counter() - start)


class _Exchange:
    """One request through a :class:`RequestGuard`: how much of its body came, the upload
    slot it holds, the refusal the guard raised in it, the status it got."""

    def __init__(self, guard: RequestGuard, scope: Scope, receive: Receive, send: Send) -> None:
        self.guard, self.scope, self._receive, self._send = guard, scope, receive, send
        self.deadline = Deadline.after(guard.timeout_s)
        scope.setdefault("state", {})["deadline"] = self.deadline
        self.started_at = time.monotonic()
        self.declared = _content_length(scope)
        self.status, self.started = 500, False
        self.received, self.body_done = 0, False
        self.slot: str | None = None
        self.refusal: tuple[int, str, Headers] | None = None
        self.too_large = f"the request body is over the limit of {guard.max_body_bytes} bytes"

    async def run(self) -> None:
        limit = self.guard.max_body_bytes
        if self.declared is not None and self.declared > limit:
            if self.declared <= limit + DRAIN_BYTES:
                await drain(self._receive, self.declared)
            await self.answer(413, self.too_large)
            return
        if (self.scope.get("method"), self.scope.get("path")) in UPLOAD_ROUTES:
            busy = self.guard.slots.busy()
            if busy is not None:
                self.guard.slots.refused += 1
                await drain(self._receive, limit + DRAIN_BYTES)
                await self.answer(503, busy, RETRY)
                return
            self.hold("receiving")
        try:
            with anyio.fail_after(max(0.0, self.deadline.left())):
                await self.guard.app(self.scope, self.receive, self.send)
        except TimeoutError:
            if not self.started:
                await self.answer(504, f"the request took over {self.guard.timeout_s:g} s")
        except HTTPException as err:
            if self.refusal is None or self.started or err.status_code != self.refusal[0]:
                raise
            await self.answer(*self.refusal)
        finally:
            self.hold(None)

    def hold(self, slot: str | None) -> None:
        self.guard.slots.move(self.slot, slot)
        self.slot = slot

    def refuse(self, status: int, detail: str, headers: Headers | None = None) -> NoReturn:
        """Stop the app's reading with ``status``: whatever the app answers is replaced."""
        self.refusal = (status, detail, headers or [])
        raise HTTPException(status, detail)

    async def answer(self, status: int, detail: str, headers: Headers | None = None) -> None:
        self.started, self.status = True, status
        await send_json(self._send, status, detail, headers)

    async def receive(self) -> Message:
        if self.body_done:  # the app listens for a disconnect
            return await self._receive()
        guard = self.guard
        due = self.started_at + guard.body_grace_s + self.received / guard.body_min_rate
        try:
            with anyio.fail_after(max(0.0, due - time.monotonic())):
                message = await self._receive()
        except TimeoutError:
            took = time.monotonic() - self.started_at
            self.refuse(
                408,
                f"the request body came too slowly ({self.received} bytes in {took:.1f} s): "
                f"this server needs {guard.body_min_rate:g} bytes/s after the first "
                f"{guard.body_grace_s:g} s",
            )
        if message["type"] != "http.request":
            return message
        self.received += len(message.get("body", b""))
        more = message.get("more_body", False)
        if self.received > guard.max_body_bytes:
            if more:  # discard what is left, if known
                left = DRAIN_BYTES // 4 if self.declared is None else self.declared - self.received
                await drain(self._receive, min(DRAIN_BYTES, left))
            self.refuse(413, self.too_large)
        if not more:
            self.body_done = True
            if self.slot == "receiving":
                self.body_received()
        return message

    def body_received(self) -> None:
        """The body is whole: its receiving slot becomes an upload slot (503 when none is
        free)."""
        slots = self.guard.slots
        self.hold(None)
        full = slots.full("in_flight")
        if full is not None:
            slots.refused += 1
            self.refuse(503, full, RETRY)
        self.hold("in_flight")

    async def send(self, message: Message) -> None:
        if self.refusal is not None:  # whatever the app made of a refused body
            if message["type"] == "http.response.start" and not self.started:
                await self.answer(*self.refusal)
            return
        if message["type"] == "http.response.start":
            self.started, self.status = True, message["status"]
        await self._send(message)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def route_of(scope: Scope) -> str:
    """The template of the route a request is for (``/items/{item_id}``), also when the guard
    answered before the app matched it. Requests no route matches are counted together (raw
    paths would grow the table)."""
    route: Any = scope.get("route")
    if route is None:
        for candidate in getattr(getattr(scope.get("app"), "router", None), "routes", []):
            if isinstance(candidate, Route) and candidate.matches(scope)[0] == Match.FULL:
                route = candidate
                break
    path = getattr(route, "path", None)
    if isinstance(path, str) and path:
        return path
    return "/static/*" if scope.get("path", "").startswith("/static/") else "(unmatched)"


#: Latencies kept per route for percentiles (the most recent ones).
WINDOW = 2048


class ServiceStats:
    """Thread-safe counters: requests by route and status, recent latencies, batching and
    cache figures. ``route`` is a route template (``/items/{item_id}``), never a raw path, so
    the number of keys stays bounded."""

    def __init__(self) -> None:
        self.started = time.time()
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, int]] = Counter()
        self._latency: dict[str, deque[float]] = {}
        self.batches = 0
        self.batched_queries = 0
        self.cache_hits = 0
        self.cache_misses = 0

    def record(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self._counts[(route, status)] += 1
            self._latency.setdefault(route, deque(maxlen=WINDOW)).append(seconds * 1000.0)

    def record_batch(self, size: int) -> None:
        with self._lock:
            self.batches += 1
            self.batched_queries += size

    def record_cache(self, hit: bool) -> None:
        with self._lock:
            if hit:
                self.cache_hits += 1
            else:
                self.cache_misses += 1

    def snapshot(self) -> dict[str, Any]:
        """Uptime, per-route counts by status and p50/p90/p99 latency (ms) over the last
        ``WINDOW`` requests, mean batch size and cache hits."""
        with self._lock:
            routes: dict[str, Any] = {}
            for (route, status), count in sorted(self._counts.items()):
                entry = routes.setdefault(route, {"requests": 0, "by_status": {}})
                entry["requests"] += count
                entry["by_status"][str(status)] = count
            for route, values in self._latency.items():
                p50, p90, p99 = np.percentile(np.fromiter(values, float), [50, 90, 99])
                routes[route]["latency_ms"] = {
                    "p50": round(float(p50), 2),
                    "p90": round(float(p90), 2),
                    "p99": round(float(p99), 2),
                    "window": len(values),
                }
            return {
                "uptime_s": round(time.time() - self.started, 1),
                "requests": sum(self._counts.values()),
                "routes": routes,
                "batching": {
                    "batches": self.batches,
                    "queries": self.batched_queries,
                    "mean_batch": round(self.batched_queries / self.batches, 2)
                    if self.batches
                    else None,
                },
                "cache": {"hits": self.cache_hits, "misses": self.cache_misses},
            }
