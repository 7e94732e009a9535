"""Keep memory that PyTorch frees in the process, for its next allocation of that size.

A training step allocates and frees the same large activation buffers every step. glibc's
malloc hands blocks above its mmap threshold back to the kernel on free (and trims the heap's
free top), so the next step maps them again and pays a page fault per 4 KiB page, with the
kernel zeroing each one: on 2 CPU cores, 20-180 thousand faults a step and about a quarter
of the step time for the default backbone at 128 px (``scripts/peers_training.py``).
:func:`keep_freed_memory` raises both thresholds once, so freed blocks stay in the heap and
are reused; the process keeps up to its peak in use (what a step needs anyway).

Applied by every task (train, evaluate, export, embed) at its start; not by the service, whose
memory is bounded by design. ``RETRIEVAL_KEEP_FREED_MEMORY=0`` leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

__all__ = ["keep_freed_memory"]

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap, not from mmap.
MMAP_THRESHOLD = 1 << 30
#: Free memory at the heap's top is returned to the kernel only beyond this.
TRIM_THRESHOLD = (1 << 31) - 1
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc malloc's mmap and trim thresholds (once per process); True when they are
    raised. False, changing nothing, off Linux, without glibc (e.g. musl has no ``mallopt``)
    or when ``RETRIEVAL_KEEP_FREED_MEMORY=0``."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("RETRIEVAL_KEEP_FREED_MEMORY", "1") == "0":
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if not _applied:
        log.warning("glibc refused the malloc thresholds: training steps pay page faults")
    return _applied
