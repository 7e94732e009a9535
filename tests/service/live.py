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


class Server(str):
    """The base URL of a running server; ``pid`` is its process id."""

    pid: int


def memory_of(pid: int) -> dict[str, int]:
    """``VmRSS`` (now) and ``VmHWM`` (peak) of a process, in bytes (Linux /proc)."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) * 1024
    return found


@contextmanager
def serve(bundle: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    """Start ``retrieval serve BUNDLE ARGS`` and yield its base URL (with its ``pid``) once
    /healthz answers; the server is stopped (SIGTERM, then SIGKILL) on exit."""
    port = free_port()
    command = [sys.executable, "-m", "retrieval.cli", "serve", str(bundle), "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--log-level", "warning", *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = Server(f"http://127.0.0.1:{port}")
    base.pid = process.pid
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
