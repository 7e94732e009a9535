"""Backend spec strings: ``milvus://HOST:PORT/COLLECTION`` and ``milvus-lite:PATH[#COLLECTION]``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from retrieval.backends.base import BackendError

__all__ = ["DEFAULT_COLLECTION", "BackendSpec", "parse_backend"]

#: the collection of a ``milvus-lite:PATH`` spec without ``#COLLECTION``
DEFAULT_COLLECTION = "retrieval"
# Milvus's rule for names (at most 255), less room for the removal record beside it
# (NAME__removed: see retrieval.backends.milvus.removals)
_COLLECTION = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,245}")
_FORMS = "milvus://HOST:PORT/COLLECTION or milvus-lite:PATH[#COLLECTION]"


@dataclass(frozen=True)
class BackendSpec:
    """A parsed spec: ``kind`` ``"milvus"`` (``uri`` is ``http://HOST:PORT``) or
    ``"milvus-lite"`` (``path``: the Milvus Lite data folder), and the collection."""

    kind: str
    collection: str
    uri: str = ""
    path: Path | None = None
    text: str = ""

    @property
    def where(self) -> str:
        """The engine and collection, as messages name them."""
        place = self.uri if self.kind == "milvus" else f"Milvus Lite at {self.path}"
        return f"collection '{self.collection}' on {place}"


def _collection(name: str, spec: str) -> str:
    if not _COLLECTION.fullmatch(name):
        raise BackendError(
            f"backend {spec!r}: collection name {name!r} must start with a letter or '_' "
            "and hold only letters, digits and '_' (at most 246)"
        )
    return name


def parse_backend(spec: str) -> BackendSpec:
    """Parse ``milvus://HOST:PORT/COLLECTION`` or ``milvus-lite:PATH[#COLLECTION]``
    (collection default :data:`DEFAULT_COLLECTION`). Raises BackendError naming the spec
    and the part that is wrong."""
    if spec.startswith("milvus://"):
        match = re.fullmatch(r"milvus://(\[[0-9A-Fa-f:.]+\]|[^/:\[\]]+):(\d{1,5})/([^/]*)/?", spec)
        if match is None:
            raise BackendError(f"backend {spec!r} is not of the form milvus://HOST:PORT/COLLECTION")
        host, port, name = match.groups()
        if not 0 < int(port) < 65536:
            raise BackendError(f"backend {spec!r}: port {port} is not between 1 and 65535")
        if not name:
            raise BackendError(
                f"backend {spec!r} names no collection (milvus://HOST:PORT/COLLECTION)"
            )
        return BackendSpec(
            "milvus", _collection(name, spec), uri=f"http://{host}:{port}", text=spec
        )
    if spec.startswith("milvus-lite:"):
        rest = spec.removeprefix("milvus-lite:")
        path, _, name = rest.partition("#")
        if not path:
            raise BackendError(f"backend {spec!r} names no folder (milvus-lite:PATH)")
        collection = _collection(name, spec) if name else DEFAULT_COLLECTION
        return BackendSpec("milvus-lite", collection, path=Path(path).resolve(), text=spec)
    raise BackendError(f"backend {spec!r}: unknown backend; use {_FORMS}")
