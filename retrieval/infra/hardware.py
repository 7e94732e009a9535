"""What the processor can do fast: native bfloat16 arithmetic on the CPU, and how many cores
this process may use (threads, data-loading workers).

PyTorch's CPU kernels (oneDNN) run bfloat16 convolutions and matrix products natively on
processors with AVX512-BF16 (Intel Cooper Lake and later, AMD Zen 4 and later) or AMX (Intel
Sapphire Rapids and later); elsewhere bfloat16 is emulated and slower than float32, so
training and embedding fall back to float32 there.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

__all__ = [
    "BF16_FLAGS",
    "cpu_flags",
    "cpu_has_bf16",
    "loader_workers",
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
