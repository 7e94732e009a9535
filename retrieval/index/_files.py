"""Index files: atomic writes with a checksum, and checked reads.

``faiss.write_index`` writes in place, so a crash mid-write would leave a truncated file;
here it writes a temporary file in the destination folder, fsyncs it and renames it over the
destination. Index files are a memory-corruption surface for faiss's reader, so a file can be
checked against the sha256 recorded when it was written before faiss parses it.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from retrieval.infra.io import fsync_dir, sha256_file


def _hash_and_sync(path: Path) -> str:
    """sha256 hex of the file at ``path``, after flushing it to disk with fsync."""
    with open(path, "r+b") as f:
        os.fsync(f.fileno())
    return sha256_file(path)


def write_atomically(faiss: Any, cpu_index: Any, path: str | os.PathLike[str]) -> str:
    """Write ``cpu_index`` to ``path`` all-or-nothing; return the file's sha256 hex.

    Raises:
        FileNotFoundError: the folder of ``path`` does not exist.
        OSError / RuntimeError: writing failed; any previous file at ``path`` is unchanged
            and no temporary file is left behind.
    """
    dest = Path(path)
    folder = dest.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot save index to {dest}: folder {folder} does not exist")
    tmp = folder / f".{dest.name}.{uuid.uuid4().hex}.tmp"
    try:
        faiss.write_index(cpu_index, str(tmp))
        sha256 = _hash_and_sync(tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(folder)
    return sha256


def check_sha256(sha256: str) -> str:
    """Validate a sha256 hex digest (64 hex digits, any case); return it lower-case."""
    if not isinstance(sha256, str) or len(sha256) != 64:
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    try:
        int(sha256, 16)
    except ValueError:
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}") from None
    return sha256.lower()


def read_checked(
    faiss: Any, path: str | os.PathLike[str], sha256: str | None, dim: int | None
) -> Any:
    """Read the faiss index at ``path``: sha256 first (when given), then metric and ``dim``.

    The file is hashed, then parsed by faiss: whoever can replace the file between the two
    steps could defeat the check, so keep index files in folders only you write to.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: checksum mismatch, or a file faiss cannot read (truncated, corrupt or
            not a faiss index); an index whose metric is not inner product or whose
            dimension is not ``dim`` (when given). Messages name the file.
    """
    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"no index file at {src}")
    if sha256 is not None:
        expected = check_sha256(sha256)
        actual = sha256_file(src)
        if actual != expected:
            raise ValueError(
                f"index file {src} has sha256 {actual}, expected {expected}: the file was "
                "changed or damaged since it was written; re-export it"
            )
    try:
        index = faiss.read_index(str(src))
    except (RuntimeError, MemoryError) as err:
        raise ValueError(
            f"cannot read the index file {src}: it is truncated, corrupt or not a faiss index "
            f"({err})"
        ) from err
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        metric = "L2" if index.metric_type == faiss.METRIC_L2 else str(index.metric_type)
        raise ValueError(
            f"index at {src} uses metric {metric}, expected inner product: "
            "EmbeddingIndex searches L2-normalised embeddings by inner product"
        )
    if dim is not None and index.d != dim:
        raise ValueError(f"index at {src} has dim {index.d}, expected {dim}")
    return index
