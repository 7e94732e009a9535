"""What the processor can do fast: native bfloat16 arithmetic on the CPU, and how many cores
this process may use (threads, data-loading workers).

PyTorch's CPU kernels (oneDNN) run bfloat16 convolutions and matrix products natively on
processors with AVX512-BF16 (Intel Cooper Lake and later, AMD Zen 4 and later) or AMX (Intel
Sapphire Rapids and later); elsewhere bfloat16 is emulated and slower than float32, so
training and embedding fall back to float32 there.

glibc malloc's settings, the one place the process changes them: tasks keep the memory
PyTorch frees for its next allocation of that size; the service gives freed images back.

A training step allocates and frees the same large activation buffers every step. glibc's
malloc hands blocks above its mmap threshold back to the kernel on free (and trims the heap's
free top), so the next step maps them again and pays a page fault per 4 KiB page, with the
kernel zeroing each one: on 2 CPU cores, 20-180 thousand faults a step and about a quarter
of the step time for the default backbone at 128 px (``scripts/peers_training.py``).
:func:`keep_freed_memory` raises both thresholds once, so freed blocks stay in the heap and
are reused; the process keeps up to its peak in use (what a step needs anyway).

Applied by every task (train, evaluate, export, embed) at its start; not by the service, whose
memory is bounded by design. ``RETRIEVAL_KEEP_FREED_MEMORY=0`` leaves malloc as it is.
:func:`return_freed_images_to_the_os` is the service's opposite setting.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
from pathlib import Path

__all__ = [
    "BF16_FLAGS",
    "cpu_flags",
    "cpu_has_bf16",
    "keep_freed_memory",
    "loader_workers",
    "return_freed_images_to_the_os",
    "training_precision",
    "usable_cores",
]


log = logging.getLogger(__name__)


#: /proc/cpuinfo flags that give native bfloat16 arithmetic.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


_CPUINFO = Path("/proc/cpuinfo")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's or SLURM's share),
    not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def loader_workers(asked: int | None, most: int = 4) -> int:
    """Data-loading processes: ``asked`` when given, else one per usable core up to ``most``
    (more workers than cores only compete with the model for them)."""
    return int(asked) if asked is not None else min(most, usable_cores())


def cpu_flags(cpuinfo: Path = _CPUINFO) -> frozenset[str]:
    """The processor's feature flags from ``cpuinfo`` (Linux); empty where it is missing."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (one of :data:`BF16_FLAGS` in
    /proc/cpuinfo). False off Linux, where the flags cannot be read."""
    return bool(cpu_flags() & set(BF16_FLAGS))


def training_precision(precision: str, on_cpu: bool, has_bf16: bool | None = None) -> str:
    """The Lightning ``precision`` to train with: ``precision`` itself, except a bfloat16 one
    (``bf16-mixed``, ``bf16-true``) on a CPU without native bfloat16, which becomes
    ``32-true`` with one warning saying so (bf16 would be slower there, and the results
    differ from float32's, so the change is never silent)."""
    supported = cpu_has_bf16() if has_bf16 is None else has_bf16
    if not (on_cpu and str(precision).startswith("bf16") and not supported):
        return precision
    log.warning(
        "trainer.precision=%s: this CPU has no native bfloat16 (none of %s in /proc/cpuinfo), "
        "so training runs in float32 (32-true) instead",
        precision,
        ", ".join(BF16_FLAGS),
    )
    return "32-true"


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
    _applied = _mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and _mallopt(
        _M_TRIM_THRESHOLD, TRIM_THRESHOLD
    )
    if not _applied:
        log.warning("glibc refused the malloc thresholds: training steps pay page faults")
    return _applied


def return_freed_images_to_the_os(threshold: int = 1 << 20) -> bool:
    """Have glibc serve allocations of ``threshold`` bytes or more (decoded images, Pillow's
    16 MiB blocks) by ``mmap``, so that freeing them gives the memory back to the system.

    Without it glibc raises that threshold as it goes and keeps freed blocks in per-thread
    arenas: a process whose decodes ran in many threads stays at several decodes' worth of
    memory, beyond what the decode slots bound. Process-wide; True when applied (Linux glibc).
    """
    return _mallopt(_M_MMAP_THRESHOLD, threshold)


def _mallopt(option: int, value: int) -> bool:
    """glibc's ``mallopt(option, value)``; False, changing nothing, off Linux or without glibc
    (e.g. musl has no ``mallopt``)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(option, value))
