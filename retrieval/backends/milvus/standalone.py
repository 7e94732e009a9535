"""A Milvus standalone server on loopback, from the ``milvus`` PyPI package ("embedded Milvus":
the server binary of Milvus 2.3, with its own etcd and local storage; no network, no Docker),
for testing and measuring the backend against a real server on one machine.

A server is started in a folder (its data, configuration and logs), answers on
``127.0.0.1:PORT`` (``milvus://127.0.0.1:PORT/COLLECTION``) and is stopped by the process that
started it. Its internal ports (etcd's among them) are fixed, so one runs on a machine at a
time. ``python -m retrieval.backends.milvus.standalone DIR`` runs one in the foreground until
Ctrl+C or SIGTERM and prints its address.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["StandaloneError", "StandaloneServer"]


class StandaloneError(RuntimeError):
    """The server cannot start here: the package is missing, or it did not answer (one line)."""


class StandaloneServer:
    """A Milvus standalone server with its data under ``folder``: :meth:`start` it (or use it
    as a context manager), reach it at :attr:`address`, :meth:`stop` it. With
    ``authorization`` it takes only known users (Milvus's first one: ``root:Milvus``)."""

    def __init__(
        self, folder: str | Path, timeout_s: float = 180.0, authorization: bool = False
    ) -> None:
        self.folder = Path(folder).resolve()
        self.timeout_s = float(timeout_s)
        self.authorization = authorization
        self._server: Any = None
        self.version = ""

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` of the running server."""
        if self._server is None:
            raise StandaloneError("the Milvus standalone server is not running")
        return f"127.0.0.1:{self._server.listen_port}"

    def start(self) -> str:
        """Start the server and wait until it answers; its :attr:`address`. Raises
        StandaloneError naming why it cannot start (the last line of its log)."""
        try:
            import milvus
        except ImportError:
            raise StandaloneError(
                "the Milvus standalone server needs the milvus package: pip install milvus"
            ) from None
        self.folder.mkdir(parents=True, exist_ok=True)
        server = milvus.MilvusServer(wait_for_started=False)
        server.set_base_dir(str(self.folder))
        server.config.set("authorization_enabled", self.authorization)
        try:
            server.start()
            self._wait(server)
        except Exception as err:
            with contextlib.suppress(Exception):
                server.stop()
            raise StandaloneError(
                f"the Milvus standalone server in {self.folder} did not start ({err}): "
                f"{self._last_log_line()}"
            ) from None
        self._server = server
        self.version = str(getattr(milvus, "__version__", ""))
        return self.address

    def _wait(self, server: Any) -> None:
        """Until the server answers its health check; a server process that exits (another
        one holds its ports, say) or a timeout raises at once."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                server.wait_started(timeout=2000)
                return
            except TimeoutError:
                pass
            if server.server_proc.poll() is not None:
                raise RuntimeError(f"it exited with status {server.server_proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer in {self.timeout_s:.0f} s")

    def _last_log_line(self) -> str:
        log = self.folder / "logs" / "milvus-stderr.log"
        with contextlib.suppress(OSError):
            lines = [line for line in log.read_text(errors="replace").splitlines() if line]
            if lines:
                return lines[-1][:300]
        return f"no log in {log.parent}"

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop the server, given ``grace_s`` seconds to shut down cleanly (so that it starts
        again on the same folder) before it is killed; nothing when it is not running."""
        if self._server is not None:
            server, self._server = self._server, None
            process = server.server_proc
            if process is not None and process.poll() is None:
                process.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=grace_s)
            server.stop()  # kills it if it is still running, closes its log files

    def __enter__(self) -> StandaloneServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Run a server in the foreground until interrupted. 0 on a clean stop, 1 when it cannot
    start (one line on stderr)."""
    parser = argparse.ArgumentParser(
        prog="python -m retrieval.backends.milvus.standalone",
        description="Run a Milvus standalone server on loopback (the milvus package).",
    )
    parser.add_argument("folder", type=Path, help="its data, configuration and logs")
    args = parser.parse_args(argv)
    server = StandaloneServer(args.folder)
    try:
        address = server.start()
    except StandaloneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"Milvus {server.version} answers on milvus://{address}/COLLECTION "
        "(Ctrl+C or SIGTERM stops it)",
        flush=True,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # as Ctrl+C: stop the server
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
