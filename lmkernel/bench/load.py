"""Time from a model file to its first token, and the memory loading it adds, each measured in a fresh
process (after the library is imported, so that neither side is charged for its imports)."""

from __future__ import annotations

import json
import signal
import subprocess  # nosec B404  # runs our own commands as argument lists, never a shell
import sys
from dataclasses import dataclass
from pathlib import Path

from lmkernel.errors import LmkError


def resident_bytes() -> int:
    """This process's resident set size now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass(frozen=True)
class LoadResult:
    seconds: float  # file to first token
    resident: int  # bytes of resident memory the load added (weights mapped and touched, caches, buffers)


def lmkernel_script(model: str, threads: int, context: int, cpu_path: str = "auto", packed_cache: str | None = None) -> str:
    """A Python program that loads `model` with lmkernel (a KV cache of `context` tokens, the CPU kernels of
    `cpu_path`, k-quant layers packed at load or kept in `packed_cache`) and prints what `LoadResult` holds."""
    return f"""
import json, time, torch
torch.set_num_threads({threads})
from lmkernel import LLM, SamplingParams, load_model
from lmkernel.bench.load import resident_bytes
from lmkernel.layers import cpu_kernels
from lmkernel.memory.kv_cache import bytes_per_block
cpu_kernels.select({cpu_path!r})  # the compiled library is imported, as every library's is before the clock starts
before = resident_bytes()
start = time.perf_counter()
loaded = load_model({model!r}, packed_cache={packed_cache!r})
llm = LLM(loaded, kv_cache_memory=bytes_per_block(loaded.config, 16, loaded.dtype) * -(-{context} // 16), verbose=False)
llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "resident": resident_bytes() - before}}))
"""


def run_script(script: str, what: str) -> LoadResult:
    """Run a measuring program in a fresh interpreter; its last line of output is the result."""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)  # nosec B603  # an argument list this module builds, no shell
    if done.returncode != 0:
        said = done.stderr.strip().splitlines()
        why = said[-1] if said else (f"killed by {signal.Signals(-done.returncode).name}" if done.returncode < 0
                                     else f"exit code {done.returncode}, no output")
        raise LmkError(f"measuring {what} failed: {why}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return LoadResult(float(result["seconds"]), int(result["resident"]))


def best_of(script: str, what: str, rounds: int) -> LoadResult:
    """The fastest of `rounds` fresh loads (the file in the page cache from the first), with its memory."""
    results = [run_script(script, what) for _ in range(rounds)]
    return min(results, key=lambda r: r.seconds)


def lmkernel_loads(model: str, threads: int, context: int, cpu_path: str, rounds: int) -> tuple[LoadResult, LoadResult]:
    """lmkernel's load of `model` the first time (its k-quant layers packed, and written to an empty packed
    cache) and every time after (mapped from that cache), each the best of `rounds` fresh processes. The
    caches are made under $LMK_HOME (a disk, as a user's would be) and removed."""
    import shutil
    import tempfile

    from lmkernel.registry import lmk_home

    lmk_home().mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-packed-", dir=lmk_home()))
    try:
        first = []
        for i in range(rounds):
            first.append(run_script(lmkernel_script(model, threads, context, cpu_path, str(root / f"first-{i}")),
                                    "lmkernel's first load"))
            shutil.rmtree(root / f"first-{i}", ignore_errors=True)
        kept = str(root / "kept")
        run_script(lmkernel_script(model, threads, context, cpu_path, kept), "lmkernel's first load")
        later = best_of(lmkernel_script(model, threads, context, cpu_path, kept), "lmkernel's load", rounds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return min(first, key=lambda r: r.seconds), later
