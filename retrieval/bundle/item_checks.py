"""What a well-formed item is: its vector (finite, unit L2 norm), uri and label (text without
control characters, of bounded length), extra fields (a JSON object) and sha256 (64 hex
digits). Used to refuse bad input before it is stored and to find damage in stored rows."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from retrieval.infra.checks import unit_rows, vectors

__all__ = [
    "MAX_LABEL",
    "MAX_URI",
    "NORM_TOLERANCE",
    "blob_problems",
    "check_vectors",
    "listed",
    "row_problems",
    "text_problem",
]

NORM_TOLERANCE = 1e-3
MAX_URI = 4096  # characters; a path or URI longer than PATH_MAX is damage, not data
MAX_LABEL = 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def check_vectors(x: Any, dim: int, n: int | None = None, name: str = "vectors") -> np.ndarray:
    """``x`` as C-contiguous float32 when it is (n, dim) finite rows of unit L2 norm (1e-3)."""
    return unit_rows(vectors(x, name, dim=dim, rows=n), name, NORM_TOLERANCE)


def text_problem(value: Any, limit: int, nullable: bool) -> str | None:
    """Why ``value`` is not a well-formed uri / label (None when it is): text of 1 to
    ``limit`` characters without control characters, or None where ``nullable``."""
    if value is None and nullable:
        return None
    if not isinstance(value, str) or not value:
        return f"must be a non-empty string{' or null' if nullable else ''}, got {value!r:.80}"
    if len(value) > limit:
        return f"is {len(value)} characters long, more than {limit}"
    if _CONTROL.search(value):
        return f"contains control characters: {value!r:.80}"
    return None


def row_problems(uri: Any, label: Any, extra: Any, sha: Any) -> list[str]:
    """What is wrong with one item row's text columns (kinds, not values: ids are listed)."""
    kinds = []
    for name, value, limit in (("uri", uri, MAX_URI), ("label", label, MAX_LABEL)):
        problem = text_problem(value, limit, nullable=name == "label")
        if problem:
            kinds.append(
                f"{name} not well-formed (text of 1 to {limit} characters without "
                "control characters" + (", or null)" if name == "label" else ")")
            )
    try:
        fields = json.loads(extra) if isinstance(extra, str) else None
    except ValueError:
        fields = None
    if not isinstance(fields, dict):
        kinds.append("extra is not a JSON object")
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        kinds.append("content_sha256 is not 64 hex digits")
    return kinds


def blob_problems(table: str, rows: list[Any], dim: int, bad: dict[str, list[int]]) -> None:
    """Add to ``bad`` (kind of damage -> ids) the ids of the ``(id, ..., vector)`` rows of
    ``table`` whose vector BLOB is not ``dim`` finite little-endian float32 of unit norm."""
    nbytes = 4 * dim
    good = []
    for row in rows:
        blob = row[-1]
        if not isinstance(blob, bytes) or len(blob) != nbytes:
            bad.setdefault(f"{table}: vector is not {nbytes} bytes", []).append(row[0])
        else:
            good.append(row)
    if not good:
        return
    x = np.frombuffer(b"".join(r[-1] for r in good), dtype="<f4").reshape(-1, dim)
    with np.errstate(all="ignore"):
        finite = np.isfinite(x).all(axis=1)
        norms = np.linalg.norm(x.astype(np.float64), axis=1)
    off = finite & (np.abs(norms - 1.0) > NORM_TOLERANCE)
    for mask, what in ((~finite, "NaN or infinite"), (off, "norm not 1")):
        for row in np.flatnonzero(mask):
            bad.setdefault(f"{table}: vector {what}", []).append(int(good[row][0]))


def listed(ids: Sequence[int]) -> str:
    """Ids for a message: the first 20 and how many there are."""
    shown = ", ".join(str(i) for i in ids[:20])
    return f"[{shown}{', ...' if len(ids) > 20 else ''}] ({len(ids)} ids)"
