"""lmkernel.bench.machine: the CPU's model name and widest vector instructions, read from /proc/cpuinfo."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmkernel.bench import machine

BASE_FLAGS = "fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma"


def _cpuinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    monkeypatch.setattr(machine, "CPUINFO", path)


def _processor(n: int, name: str, flags: str) -> str:
    return f"processor\t: {n}\nvendor_id\t: GenuineIntel\nmodel name\t: {name}\nflags\t\t: {flags}\n\n"


@pytest.mark.parametrize(("extra", "isa"), [
    ("", "AVX2"),
    ("avx512f avx512bw avx512dq", "AVX-512"),
    ("avx512f avx512bw avx512_vnni", "AVX-512 VNNI"),
    ("avx512f avx512_vnni amx_bf16 amx_tile amx_int8", "AVX-512 VNNI, AMX"),
])
def test_the_widest_instructions_the_flags_list(tmp_path, monkeypatch, extra: str, isa: str) -> None:
    flags = f"{BASE_FLAGS} {extra}".strip()
    _cpuinfo(tmp_path, monkeypatch, _processor(0, "Intel(R) Xeon(R) Platinum 8480+", flags)
             + _processor(1, "Intel(R) Xeon(R) Platinum 8480+", flags))
    assert machine.cpu_isa() == isa


def test_the_model_name_is_the_first_processors(tmp_path, monkeypatch) -> None:
    _cpuinfo(tmp_path, monkeypatch, _processor(0, "AMD EPYC 9654 96-Core Processor", BASE_FLAGS)
             + _processor(1, "Something Else", BASE_FLAGS))
    assert machine.cpu_name() == "AMD EPYC 9654 96-Core Processor"


def test_a_cpuinfo_without_a_model_name_says_unknown(tmp_path, monkeypatch) -> None:
    _cpuinfo(tmp_path, monkeypatch, "processor\t: 0\nCPU implementer\t: 0x41\nFeatures\t: fp asimd\n")
    assert machine.cpu_name() == "unknown CPU"
