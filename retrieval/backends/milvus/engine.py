"""Reaching a Milvus engine: the ``pymilvus`` client, the server's version (what the collection
layout may use; servers older than 2.3 are refused), this process's Milvus Lite servers (one
per data folder, shared by every backend that opens it and stopped with the last), and the
engine's own logs of errors that the backend reports itself."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.backends.base import BackendError, BackendSpec

__all__ = [
    "TOKEN_VARIABLE",
    "ServerVersion",
    "engine_logs_held",
    "open_client",
    "release",
    "server_version",
]

#: the environment variable whose value a Milvus server is given as credentials
TOKEN_VARIABLE = "RETRIEVAL_MILVUS_TOKEN"

#: the oldest Milvus the backend works with: upserts, JSON fields and count(*) queries
OLDEST = (2, 3, 0)
#: the first Milvus whose fields may be null; on older servers a collection stores "no label"
#: and "no hash" as empty text (:mod:`~retrieval.backends.milvus.collection`)
NULLABLE_FROM = (2, 5, 0)
_RELEASE = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)")

_lite_users: dict[Path, int] = {}  # Milvus Lite folders opened in this process -> backends
_lite_lock = threading.Lock()
log = logging.getLogger(__name__)
#: loggers through which pymilvus (every failed call, with a traceback) and Milvus Lite (its
#: server's failures, its notes on recovering files after a crash) write to stderr
_ENGINE_LOGGERS = ("pymilvus.decorators", "milvus_lite")


class _Hold(logging.Handler):
    """Keeps the first line of each record (and of its exception) instead of printing it."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        text = str(error or "") or record.getMessage()
        self.lines.append((text.splitlines() or [""])[0])


@contextlib.contextmanager
def engine_logs_held() -> Iterator[list[str]]:
    """Inside, what pymilvus and Milvus Lite log (tracebacks of errors that the caller reports
    in one line, Milvus Lite's notes on the files it recovers) goes to the yielded list, one
    line a record, and to this module's debug log instead of stderr. For the opening of a
    backend: it changes the engine's loggers for the whole process while it lasts."""
    with contextlib.suppress(ImportError):  # open_client says what to install
        import pymilvus  # noqa: F401  (its import configures its loggers: first, not inside)
    hold = _Hold()
    loggers = [logging.getLogger(name) for name in _ENGINE_LOGGERS]
    saved = [(lg.propagate, lg.handlers[:]) for lg in loggers]
    for lg in loggers:
        lg.propagate, lg.handlers = False, [hold]
    try:
        yield hold.lines
    finally:
        for lg, (propagate, handlers) in zip(loggers, saved, strict=True):
            lg.propagate, lg.handlers = propagate, handlers
        for line in hold.lines:
            log.debug("engine: %s", line)


def _import_pymilvus(spec: BackendSpec) -> Any:
    try:
        import pymilvus
    except ImportError:
        raise BackendError(
            f"backend {spec.text!r} needs pymilvus (and milvus-lite for milvus-lite:): "
            "pip install -e '.[milvus]'"
        ) from None
    return pymilvus


def _lite_uri(spec: BackendSpec) -> str:
    """Start (or reuse) this process's Milvus Lite server for ``spec.path``; its address."""
    assert spec.path is not None
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:
        raise BackendError(
            f"backend {spec.text!r} needs milvus-lite: pip install -e '.[milvus]'"
        ) from None
    if spec.path.exists() and not spec.path.is_dir():
        raise BackendError(f"backend {spec.text!r}: {spec.path} is a file, not a folder")
    try:
        spec.path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BackendError(f"backend {spec.text!r}: cannot create {spec.path}: {err}") from None
    with _lite_lock, engine_logs_held() as said:
        uri = server_manager_instance.start_and_get_uri(str(spec.path))
        if uri is None:
            raise BackendError(
                f"backend {spec.text!r}: Milvus Lite cannot open {spec.path} "
                f"({said[-1] if said else 'it did not start'}): Milvus Lite serves one "
                "process; for several, run 'python -m milvus_lite server --data-dir "
                f"{spec.path} --port PORT' and use --backend milvus://127.0.0.1:PORT/COLLECTION"
            )
        _lite_users[spec.path] = _lite_users.get(spec.path, 0) + 1
    return str(uri)


def _release_lite(path: Path) -> None:
    from milvus_lite.server_manager import server_manager_instance

    with _lite_lock:
        left = _lite_users.get(path, 0) - 1
        if left > 0:
            _lite_users[path] = left
            return
        _lite_users.pop(path, None)
        server_manager_instance.release_server(str(path))


def release(spec: BackendSpec) -> None:
    """Let go of the Milvus Lite server of ``spec`` (nothing for a ``milvus://`` engine)."""
    if spec.kind == "milvus-lite" and spec.path is not None:
        _release_lite(spec.path)


@dataclass(frozen=True)
class ServerVersion:
    """What a Milvus engine says it is: ``text`` as it says it (``v2.3.5``, ``milvus_lite-3.2.2``),
    ``release`` its (major, minor, patch) for a server, None for Milvus Lite (which has every
    feature the backend uses) or a version that does not read as one."""

    text: str
    release: tuple[int, int, int] | None
    lite: bool

    @property
    def nullable(self) -> bool:
        """Whether new collections may have fields that take null (Milvus 2.5 on, Lite)."""
        return self.lite or (self.release is not None and self.release >= NULLABLE_FROM)

    @property
    def name(self) -> str:
        return f"Milvus Lite ({self.text})" if self.lite else f"Milvus {self.text}"


def server_version(client: Any) -> ServerVersion:
    """The version of the engine ``client`` is connected to."""
    text = str(client.get_server_version()).strip()
    if text.startswith("milvus_lite"):
        return ServerVersion(text, None, True)
    found = _RELEASE.match(text)
    release = tuple(int(part) for part in found.groups()) if found else None
    return ServerVersion(text, release, False)  # type: ignore[arg-type]


def _check_version(client: Any, spec: BackendSpec) -> None:
    version = server_version(client)
    if version.release is not None and version.release < OLDEST:
        oldest = ".".join(str(part) for part in OLDEST)
        raise BackendError(
            f"{version.name} at {spec.where} is older than {oldest}, the oldest the backend "
            "works with (it needs upserts, JSON fields and count queries): upgrade the server"
        )


def _answers(uri: str) -> bool:
    """Whether something accepts TCP connections at ``http://HOST:PORT``."""
    host, _, port = uri.removeprefix("http://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
    except (OSError, ValueError):
        return False
    return True


def open_client(spec: BackendSpec, timeout_s: float) -> Any:
    """A ``MilvusClient`` connected to the engine of ``spec`` (its Milvus Lite server started
    if needed; :func:`release` it after closing the client). A server is given the token of
    :data:`TOKEN_VARIABLE` (``USER:PASSWORD``, or an API key) when it is set. Raises
    BackendError: pymilvus or milvus-lite missing, the engine unreachable, the credentials
    refused, or a server older than :data:`OLDEST`."""
    pymilvus = _import_pymilvus(spec)
    uri = _lite_uri(spec) if spec.kind == "milvus-lite" else spec.uri
    token = os.environ.get(TOKEN_VARIABLE, "") if spec.kind == "milvus" else ""
    try:
        client = pymilvus.MilvusClient(uri=uri, token=token, timeout=timeout_s)
        client.list_collections()
    except Exception as err:  # grpc / pymilvus errors of every kind
        release(spec)
        reason = getattr(err, "message", None) or str(err) or type(err).__name__
        reason = str(reason).splitlines()[0]
        if spec.kind == "milvus" and _answers(uri):  # a listener that refused the client
            raise BackendError(
                f"Milvus for {spec.where} answers but refused the connection ({reason}): "
                f"wrong or missing credentials? set {TOKEN_VARIABLE}=USER:PASSWORD (or an API "
                "key), or check that HOST:PORT is Milvus's gRPC port"
            ) from None
        raise BackendError(f"cannot reach Milvus for {spec.where}: {reason}") from None
    try:
        _check_version(client, spec)
    except BaseException:
        client.close()
        release(spec)
        raise
    return client
