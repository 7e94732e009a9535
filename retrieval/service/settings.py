"""What a running service allows: upload and pixel limits, timeouts, batching, caching."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from retrieval.service.budget import default_decode_memory, default_decode_slots

#: Environment variable holding the bearer token that enables writes (``--token`` wins).
TOKEN_ENV = "RETRIEVAL_TOKEN"


@dataclass(frozen=True)
class ServiceSettings:
    """Limits and tuning of the service; every field is checked on construction.

    Attributes:
        token: bearer token required by ``POST /items`` and ``DELETE /items/{id}``; None
            disables writes.
        max_body_bytes: largest request body; larger ones get 413 before they are read.
        max_pixels: largest image (width x height), read from its header before decoding.
        max_k: most results one search may ask for.
        max_files: most images one ``POST /items`` may carry.
        request_timeout_s: a request still running after this gets 504.
        batch_size: most queries embedded together.
        batch_wait_ms: how long the first query of a batch waits for others.
        cache_size, cache_ttl_s: embeddings of recent identical uploads are reused.
        thumbnail_px: longest side of thumbnails.
        uploads_dir: where images added over HTTP are kept (default: ``BUNDLE/uploads``).
        cors_origins: web origins allowed to call the API from a browser.
        decode_slots: most decodes of large images (over ``SMALL_PIXELS``) at a time; None:
            ``min(cores, decode_memory_mb / (8 bytes x max_pixels))``, at least 1 (8 bytes a
            pixel is a decode's worst case, see :mod:`retrieval.service.budget`).
        decode_queue: most large decodes waiting for a slot; one more gets 503 + Retry-After.
        decode_memory_mb: memory the large decodes may hold together, for ``decode_slots``;
            None: 1/8 of the machine's memory, at most 2048.
        max_requests: most uploads (``POST /search``, ``POST /items``) received whole and not
            yet answered; one more gets 503 + Retry-After (before its body is read when they
            are already there). Small decodes (one slot a core) queue within this bound.
        max_receiving: most upload bodies still arriving; one more gets 503 + Retry-After.
            Each holds about 1 MiB of its body in memory at most (the form parser spools
            larger files to disk).
        body_grace_s, body_min_rate: a request body must have arrived at ``body_min_rate``
            bytes/s after its first ``body_grace_s`` seconds: by ``body_grace_s + received /
            body_min_rate`` seconds after its headers; later gets 408. A client that trickles
            its body holds a receiving slot that long, never one of ``max_requests``.
    """

    token: str | None = None
    max_body_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_k: int = 100
    max_files: int = 32
    request_timeout_s: float = 30.0
    batch_size: int = 16
    batch_wait_ms: float = 2.0
    cache_size: int = 256
    cache_ttl_s: float = 120.0
    thumbnail_px: int = 256
    uploads_dir: Path | None = None
    cors_origins: tuple[str, ...] = field(default_factory=tuple)
    decode_slots: int | None = None
    decode_queue: int = 8
    decode_memory_mb: float | None = None
    max_requests: int = 32
    max_receiving: int = 128
    body_grace_s: float = 5.0
    body_min_rate: int = 32 * 1024

    def __post_init__(self) -> None:
        positive = {
            "max_body_bytes": self.max_body_bytes,
            "max_pixels": self.max_pixels,
            "max_k": self.max_k,
            "max_files": self.max_files,
            "request_timeout_s": self.request_timeout_s,
            "batch_size": self.batch_size,
            "thumbnail_px": self.thumbnail_px,
            "max_requests": self.max_requests,
            "max_receiving": self.max_receiving,
            "body_grace_s": self.body_grace_s,
            "body_min_rate": self.body_min_rate,
            **({} if self.decode_slots is None else {"decode_slots": self.decode_slots}),
            **(
                {} if self.decode_memory_mb is None else {"decode_memory_mb": self.decode_memory_mb}
            ),
        }
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"service setting {name} must be a positive number, got {value!r}")
        for name, value in {
            "batch_wait_ms": self.batch_wait_ms,
            "cache_size": self.cache_size,
            "cache_ttl_s": self.cache_ttl_s,
            "decode_queue": self.decode_queue,
        }.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"service setting {name} must be >= 0, got {value!r}")
        if self.token is not None and len(self.token) < 8:
            raise ValueError("the write token must have at least 8 characters")

    def decode_memory_bytes(self) -> int:
        if self.decode_memory_mb is None:
            return default_decode_memory()
        return int(self.decode_memory_mb * 1024 * 1024)

    def large_decode_slots(self) -> int:
        """``decode_slots``, or its default from the cores and ``decode_memory_mb``."""
        if self.decode_slots is not None:
            return int(self.decode_slots)
        return default_decode_slots(self.max_pixels, self.decode_memory_bytes())

    def small_decode_slots(self) -> int:
        """Decodes of small images at a time: one a core."""
        return max(1, os.cpu_count() or 1)

    @staticmethod
    def token_from(cli_token: str | None) -> str | None:
        """The token given on the command line, else the environment's, else None."""
        return cli_token or os.environ.get(TOKEN_ENV) or None
