"""keep_freed_memory: glibc keeps freed blocks, so re-allocating them costs no page faults."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHILD = """
import resource, sys
import numpy as np
from retrieval.infra.hardware import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "on" else False
a = np.ones(64 << 20, np.uint8); del a  # 64 MiB: above glibc's default mmap threshold
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    a = np.ones(64 << 20, np.uint8); del a
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, env: dict[str, str] | None = None) -> tuple[bool, int]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_blocks_are_reused_without_page_faults() -> None:
    applied, kept = _faults("on")
    if not applied:
        pytest.skip("this libc has no mallopt (not glibc)")
    _, default = _faults("off")
    # glibc's default maps every 64 MiB block afresh and faults its pages in (fewer than one
    # a 4 KiB page where the kernel uses huge pages); kept, the same block comes back
    assert default >= 100
    assert kept * 10 < default


def test_the_environment_switch_leaves_malloc_alone() -> None:
    import os

    env = {**os.environ, "RETRIEVAL_KEEP_FREED_MEMORY": "0"}
    assert _faults("on", env)[0] is False
