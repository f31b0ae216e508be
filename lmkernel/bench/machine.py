"""The machine a comparison ran on, as its report names it: the CPU's model and its widest vector instructions."""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpu_name() -> str:
    """The CPU's model name, so a report says which machine its numbers come from."""
    return next((line.split(":", 1)[1].strip() for line in CPUINFO.read_text().splitlines()
                 if line.startswith("model name")), "unknown CPU")


def cpu_isa() -> str:
    """The widest of AMX, AVX-512 VNNI, AVX-512 and AVX2 the CPU reports: what the kernels on both sides can use."""
    flags = CPUINFO.read_text()
    return ("AVX-512 VNNI, AMX" if "amx_int8" in flags else "AVX-512 VNNI" if "avx512_vnni" in flags
            else "AVX-512" if "avx512f" in flags else "AVX2")
