"""Run ``retrieval serve`` for real: a child process listening on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(bundle: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """Start ``retrieval serve BUNDLE ARGS`` and yield its base URL once /healthz answers;
    the server is stopped (SIGTERM, then SIGKILL) on exit. Its output is shown on failure."""
    port = free_port()
    command = [sys.executable, "-m", "retrieval.cli", "serve", str(bundle), "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--log-level", "warning", *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"retrieval serve exited early:\n{process.stdout.read()}")  # type: ignore[union-attr]
            try:
                if httpx.get(f"{base}/healthz", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("retrieval serve did not answer /healthz within 120 s")
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
