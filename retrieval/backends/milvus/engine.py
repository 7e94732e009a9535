"""Reaching a Milvus engine: the ``pymilvus`` client, and this process's Milvus Lite servers
(one per data folder, shared by every backend that opens it and stopped with the last)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from retrieval.backends.base import BackendError
from retrieval.backends.spec import BackendSpec

__all__ = ["open_client", "release"]

_lite_users: dict[Path, int] = {}  # Milvus Lite folders opened in this process -> backends
_lite_lock = threading.Lock()


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
    with _lite_lock:
        uri = server_manager_instance.start_and_get_uri(str(spec.path))
        if uri is None:
            raise BackendError(
                f"backend {spec.text!r}: Milvus Lite cannot open {spec.path} (is another "
                "process using it? Milvus Lite serves one process; for several, run "
                f"'python -m milvus_lite server --data-dir {spec.path} --port PORT' and use "
                "--backend milvus://127.0.0.1:PORT/COLLECTION)"
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


def open_client(spec: BackendSpec, timeout_s: float) -> Any:
    """A ``MilvusClient`` connected to the engine of ``spec`` (its Milvus Lite server started
    if needed; :func:`release` it after closing the client). Raises BackendError: pymilvus or
    milvus-lite missing, or the engine unreachable."""
    pymilvus = _import_pymilvus(spec)
    uri = _lite_uri(spec) if spec.kind == "milvus-lite" else spec.uri
    try:
        client = pymilvus.MilvusClient(uri=uri, timeout=timeout_s)
        client.list_collections()
    except Exception as err:  # grpc / pymilvus errors of every kind
        release(spec)
        reason = getattr(err, "message", None) or str(err) or type(err).__name__
        reason = str(reason).splitlines()[0]
        raise BackendError(f"cannot reach Milvus for {spec.where}: {reason}") from None
    return client
