"""Native bfloat16 on the CPU: read from /proc/cpuinfo's flags; without it a bf16 training
precision falls back to float32 and says so once."""

from __future__ import annotations

import logging

from retrieval.infra.hardware import cpu_flags, training_precision

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse2 avx2 avx512f {extra}
processor\t: 1
flags\t\t: fpu sse2 avx2 avx512f {extra}
"""


def test_flags_are_read_from_cpuinfo(tmp_path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO.format(extra="avx512_bf16"))
    assert {"avx512f", "avx512_bf16"} <= cpu_flags(info)
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_bf16_without_native_support_falls_back_to_float32_and_says_so(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        assert training_precision("bf16-mixed", on_cpu=True, has_bf16=False) == "32-true"
    assert len(caplog.records) == 1
    assert "no native bfloat16" in caplog.text and "32-true" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert training_precision("bf16-mixed", on_cpu=True, has_bf16=True) == "bf16-mixed"
        assert training_precision("bf16-mixed", on_cpu=False, has_bf16=False) == "bf16-mixed"
        assert training_precision("32-true", on_cpu=True, has_bf16=False) == "32-true"
    assert not caplog.records
