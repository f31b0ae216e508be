"""The CPU kernels PyTorch lacks, built from `lmkernel/csrc` on first use (about a minute, once a machine).

- `paged_decode` (attention.cpp): single-token attention that reads K/V through the block tables in
  one pass, every key and value once for all the query heads that share it.
- `small_linear`, `int8_linear`, `int8_group_linear`, `int4_linear` (dense_linear.cpp): y = x W^T for
  one to four rows, W float32/bfloat16, int8 or packed int4, the output rows split over the threads,
  weight rows streamed with AVX-512 or AVX2 and FMA (plain C++ elsewhere) and prefetched ahead.
- `gguf_linear`, `gguf_embedding`, `gguf_dequantize` (gguf_linear.cpp, gguf_blocks.cpp, gguf_dot.cpp,
  gguf_gemm.cpp): GGUF weights
  in their own blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K; F32/F16/BF16 rows); activation
  rows are quantized to 8 bits per block and multiplied in integers (AVX2 `maddubs`, VNNI where present).
- `rms_norm`, `rotary` (elementwise.cpp): a decode step's few rows in one call each.
- `LlamaDecoder` (llama_decode.cpp): a whole Llama decoder for a decode step of up to 64 sequences,
  its weights held as named records (`Projection`, `DecoderLayer`).

The code path for this CPU (AVX-512, AVX2, VNNI) is chosen when the library is built: it is compiled
with `-march=native` and its name hashes the CPU's flags with the sources. Narrower builds of the same
sources (`library("avx512")`, `library("avx2")`) run on the same machine, so every path is tested where
a wider CPU runs it, and `select` makes one of them the process's kernels. AMX tiles (gguf_amx.cpp) are
a run-time choice inside the native build: asked of the OS and probed once, switched by `select`. Each
process builds in a private directory and publishes the library with one atomic rename, so a build killed half way never
leaves a lock that later processes wait on. When the compiler or ninja is missing, callers keep using
the portable PyTorch paths.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent.parent / "csrc"
_SOURCES = ("bindings.cpp", "dense_linear.cpp", "gguf_blocks.cpp", "gguf_dot.cpp", "gguf_gemm.cpp", "gguf_amx.cpp",
            "gguf_x16.cpp", "gguf_linear.cpp", "attention.cpp", "elementwise.cpp", "llama_decode.cpp")
_CFLAGS = ["-O3", "-ffast-math", "-fopenmp"]
# Builds of the sources: this CPU's widest, and narrower ones any x86-64 machine with AVX-512 (Skylake-X,
# Zen 4) or AVX2 (Haswell, Zen 1) runs; `PATHS` names what `select` takes.
BUILDS = {"native": ["-march=native"], "avx512": ["-march=skylake-avx512", "-mtune=native"],
          "avx2": ["-march=haswell", "-mtune=native"]}
PATHS = ("auto", "amx", "avx512-vnni", "avx512", "avx2")  # config.CPU_PATHS


def _cpu_flags() -> str:
    """The CPU's feature flags: `-march=native` code built on one CPU may not run on another."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = platform.processor()
    return f"{platform.machine()} {flags}"


def _module_name(flags: list[str]) -> str:
    """The library's name: a hash of everything that makes one build differ from another."""
    sources = "\n".join(p.read_text() for p in sorted(CSRC.iterdir()) if p.suffix in (".cpp", ".h"))
    key = "\n".join([sources, _cpu_flags(), torch.__version__, sys.version, " ".join(flags)])
    return f"lmkernel_cpu_{hashlib.sha1(key.encode(), usedforsecurity=False).hexdigest()[:16]}"


def _import(name: str, path: Path) -> object:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile(name: str, root: Path, flags: list[str]) -> object:
    """Build in a directory of this process's own, then publish the library with one atomic rename.

    torch's own cache shares one build directory guarded by a lock file; a build killed half way leaves
    that file behind and every later process waits on it forever. Here a killed build leaves only a
    private directory, and a finished library is either published whole or not at all.
    """
    from torch.utils.cpp_extension import load

    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{name}.build.", dir=root) as build_dir:
        module = load(name=name, sources=[str(CSRC / s) for s in _SOURCES], extra_cflags=flags,
                      extra_ldflags=["-fopenmp"], extra_include_paths=[str(CSRC)], build_directory=build_dir,
                      verbose=False)
        built = Path(build_dir) / f"{name}.so"
        staged = root / f".{name}.{os.getpid()}.so"
        shutil.copyfile(built, staged)
        os.replace(staged, root / f"{name}.so")
    return module


def _build_root() -> Path:
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / "lmkernel"


@lru_cache(maxsize=None)
def library(build: str = "native") -> object | None:
    """The kernels compiled for one of `BUILDS` (once a machine, then loaded); None without a compiler."""
    if build not in BUILDS:
        raise ValueError(f"no kernel build {build!r}: expected one of {', '.join(BUILDS)}")
    try:
        flags = _CFLAGS + BUILDS[build]
        name, root = _module_name(flags), _build_root()
        path = root / f"{name}.so"
        return _import(name, path) if path.exists() else _compile(name, root, flags)
    except Exception as exc:  # no compiler, no ninja: the portable paths still work
        log.warning("CPU kernels (%s build) unavailable, using the portable PyTorch paths: %s", build, exc)
        return None


_selected = {"build": "native"}  # the process's kernels: one choice, made by `select` before the first call


def _kernel() -> object | None:
    return library(_selected["build"])


def build() -> bool:
    """Compile the kernels now (an engine does this at start, so no request waits for the compiler)."""
    return _kernel() is not None


def select(path: str = "auto") -> str:
    """Make `path` (one of `PATHS`) this process's CPU kernels and return the path that runs: auto takes
    the widest the CPU and OS allow (AMX tiles where granted, with one log line where they are refused);
    a named path that this machine cannot run is an error."""
    if path not in PATHS:
        raise ValueError(f"CPU path must be one of {', '.join(PATHS)}; got {path!r}")
    build_name = path if path in ("avx512", "avx2") else "native"
    needs = {"avx512": "avx512bw", "avx2": "avx2"}.get(build_name)
    if needs is not None and needs not in _cpu_flags().split():
        raise RuntimeError(f"this CPU has no {needs}: the {path} kernels cannot run here")
    kernel = library(build_name)
    if kernel is None:
        if path != "auto":
            raise RuntimeError(f"the {path} kernels did not build on this machine")
        return "portable"
    if path == "avx512-vnni" and kernel.isa() != "avx512-vnni":
        raise RuntimeError(f"this CPU has no AVX-512 VNNI (its widest kernels are {kernel.isa()})")
    if build_name == "native":
        usable = kernel.amx_usable()
        if path == "amx" and not usable:
            raise RuntimeError(f"AMX tiles are not usable here: {kernel.amx_status()}")
        if path == "auto" and not usable and "CPU reports no AMX" not in kernel.amx_status() and "build has no" not in kernel.amx_status():
            log.warning("AMX tiles refused, using %s: %s", kernel.isa(), kernel.amx_status())
        kernel.amx_enable(path in ("auto", "amx"))
    _selected["build"] = build_name
    return current_path()


def current_path() -> str:
    """The code path the process's kernels run: amx, avx512-vnni, avx512, avx2 or portable."""
    kernel = _kernel()
    if kernel is None:
        return "portable"
    return "amx" if kernel.amx_active() else kernel.isa()


def amx_status() -> str:
    """Why AMX tiles are or are not usable in this process."""
    kernel = library("native")
    return "no kernels" if kernel is None else kernel.amx_status()


def int8_peak(tiles: bool, seconds: float = 0.25) -> float:
    """int8 multiply-adds a second this process reaches on AMX tiles (`tiles`) or 512-bit VNNI vectors, all
    threads, in a loop that touches no memory: the compute limit a benchmark compares with (0: no such units)."""
    kernel = library("native")
    if kernel is None:
        return 0.0
    reps = 1 << 12
    while True:  # grow the loop until it runs long enough to time
        start = time.perf_counter()
        rate = kernel.int8_peak(tiles, reps)
        if rate == 0 or time.perf_counter() - start >= seconds / 4:
            break
        reps *= 4
    return max(rate, kernel.int8_peak(tiles, reps)) if rate else 0.0


def paged_decode_available(q: torch.Tensor) -> bool:
    """Whether the paged decode kernel can serve this query (float32 on CPU) and has been built."""
    return q.device.type == "cpu" and q.dtype == torch.float32 and _kernel() is not None


def paged_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
    block_size: int, scale: float, window: int | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence over its cached context (its last `window` tokens where given):
    q [B, Hq, D] -> [B, Hq, D]."""
    return _kernel().paged_decode(q.contiguous(), k_cache, v_cache, tables, lens, block_size, scale, window or 0)


SMALL_LINEAR_MAX_ROWS = 4


def small_linear_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the streaming kernel runs x [M, K] @ weight[N, K]^T: where it beats PyTorch.

    Measured in `lmk bench latency`: float32 weights gain at 1 to 4 rows; bfloat16 weights only from
    2 rows (PyTorch's bfloat16 matrix-vector product is already as fast at one row).
    """
    rows = x.shape[0]
    return (
        x.device.type == "cpu"
        and x.dim() == 2
        and rows <= SMALL_LINEAR_MAX_ROWS
        and weight.dtype == x.dtype
        and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and rows >= 2))
        and weight.is_contiguous()
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and _kernel() is not None
    )


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T (+ bias) with the streaming kernel (where `small_linear_applies`)."""
    return _kernel().small_linear(x, weight, bias)


def int8_linear_applies(x: torch.Tensor) -> bool:
    """Whether the int8 kernels take x (rows on CPU, four at a time)."""
    return x.device.type == "cpu" and _kernel() is not None


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M <= 4, K] times an int8 weight [N, K] with per-row scales [N], or per-group scales
    [N, K/G] -> float32 [M, N] (where `int8_linear_applies`)."""
    kernel = _kernel()
    return kernel.int8_linear(x, weight, scale) if scale.dim() == 1 else kernel.int8_group_linear(x, weight, scale)


def int4_chunk() -> int | None:
    """How many codes one chunk of the int4 kernel's nibble layout holds (None without the kernels)."""
    kernel = _kernel()
    return None if kernel is None else kernel.int4_chunk()


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] -> the int4 kernel's layout [N, K/2]."""
    return _kernel().pack_int4(codes)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group: int) -> torch.Tensor:
    """x [M <= 4, K] times a `pack_int4` weight -> float32 [M, N]."""
    return _kernel().int4_linear(x, packed, scales, mins, group)


def _float_rows(x: torch.Tensor) -> bool:
    """Whether the fused elementwise kernels take x: float32 and contiguous on CPU, outside autograd
    (they beat PyTorch's four or five small operations at every size: one pass, every thread)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()
            and not (torch.is_grad_enabled() and x.requires_grad))


def rms_norm_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the fused kernel takes the RMS norm of the rows of x [N, D]."""
    return (x.dim() == 2 and _float_rows(x) and weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and weight.requires_grad) and _kernel() is not None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm of the rows of x [N, D] in one call (where `rms_norm_applies`)."""
    return _kernel().rms_norm(x, weight, eps)


def rotary_applies(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether the fused kernel rotates x [N, heads, D] by cos/sin [N, D]."""
    return (x.dim() == 3 and _float_rows(x) and cos.dtype == torch.float32 and cos.is_contiguous()
            and sin.is_contiguous() and _kernel() is not None)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [N, heads, D] by cos/sin [N, D] in one call (where `rotary_applies`)."""
    return _kernel().rotary(x, cos, sin)


def silu_mul_applies(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether the fused kernel computes silu(gate) * up."""
    return _float_rows(gate) and _float_rows(up) and gate.shape == up.shape and _kernel() is not None


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in one pass, SwiGLU (where `silu_mul_applies`)."""
    return _kernel().silu_mul(gate, up)


def llama_decode_available() -> bool:
    """Whether the whole-decoder kernel has been built (CPU)."""
    return _kernel() is not None


def projection(kind: str, weight: torch.Tensor, in_features: int, scale: torch.Tensor | None = None,
               mins: torch.Tensor | None = None, bias: torch.Tensor | None = None, gguf_type: int = -1) -> object:
    """One linear layer as `LlamaDecoder` reads it (kinds: float32, int8, int8_group, int4, gguf,
    gguf_packed); its tensors are checked here, once."""
    return _kernel().Projection(kind, weight, scale, mins, bias, gguf_type, in_features)


def decoder_layer(input_norm: torch.Tensor, post_norm: torch.Tensor, window: int | None = None,
                  **projections: object) -> object:
    """A decoder layer's norms and its q, k, v, o, gate, up and down `projection`s, by name; `window`: its
    attention reads only the last `window` tokens (sliding window)."""
    return _kernel().DecoderLayer(input_norm, post_norm, window=window or 0, **projections)


def llama_decoder(layers: list[object], num_heads: int, num_kv_heads: int, head_dim: int, eps: float) -> object:
    """Every Llama decoder layer for one new token of each of up to 64 sequences, as one compiled call:
    `.forward(h, k_caches, v_caches, cos, sin, slots, tables, lens, block_size)`; new K/V go to `slots`,
    attention reads each context through `tables` and `lens` as `paged_decode` does."""
    return _kernel().LlamaDecoder(layers, num_heads, num_kv_heads, head_dim, eps)


def gguf_block_layout(gguf_type: int) -> tuple[int, int] | None:
    """(weights, bytes) of one block of a GGML type the kernels run; None for any other type or
    without the kernels."""
    kernel = _kernel()
    layout = kernel.gguf_block_layout(gguf_type) if kernel is not None else []
    return (layout[0], layout[1]) if layout else None


def gguf_linear(x: torch.Tensor, blocks: torch.Tensor, gguf_type: int, bias: torch.Tensor | None = None,
                packed: bool = False, invariant: bool = False) -> torch.Tensor:
    """x [M, K] float32 times GGUF blocks [N, row bytes] of `gguf_type` (or `gguf_pack`'s layout) -> [M, N] float32;
    `invariant`: each row of y the same bits whatever other rows x has (the row kernels at any M)."""
    return _kernel().gguf_linear(x, blocks, gguf_type, bias, packed, invariant)


# Types `GGUFLinear.pack` packs at load: Q4_K and Q6_K (a decode step on the packed rows reads the memory at
# 88-94% of a float sum's bandwidth here, the stored rows at 52-58%: BENCHMARKS.md).
PACKED_TYPES = (12, 14)


def gguf_packable(gguf_type: int, rows: int) -> bool:
    """Whether `GGUFLinear.pack` packs rows of this type (`PACKED_TYPES`, in whole groups of 16) and this
    build's decode kernels read the packed layout (AVX-512 with VNNI, or AVX2)."""
    kernel = _kernel()
    return gguf_type in PACKED_TYPES and rows % 16 == 0 and kernel is not None and kernel.gguf_packed_kernel()


def gguf_packed_shape(gguf_type: int, rows: int, width: int) -> tuple[int, int]:
    """The shape `gguf_pack` gives `rows` rows of `width` weights: [rows / 16, width / 256 * 16 * bytes of a
    row's super-block in the layout]."""
    return rows // 16, width // 256 * 16 * _kernel().gguf_packed_bytes(gguf_type)


def gguf_pack(blocks: torch.Tensor, gguf_type: int, width: int) -> torch.Tensor:
    """Stored k-quant blocks [N, row bytes] -> the decode layout (16 rows interleaved, scales unpacked;
    csrc/gguf_x16.h): a decode step then streams them once with no per-block unpacking."""
    return _kernel().gguf_pack(blocks, gguf_type, width)


def release_pages(t: torch.Tensor) -> None:
    """Hand the whole pages of t's bytes back to the OS (clean pages of a mapped file are read again if touched)."""
    kernel = _kernel()
    if kernel is not None:
        kernel.release_pages(t)


def gguf_embedding(ids: torch.Tensor, blocks: torch.Tensor, gguf_type: int, width: int) -> torch.Tensor:
    """The rows `ids` (int64) of a table of GGUF blocks, dequantized: float32 [len(ids), width]."""
    return _kernel().gguf_embedding(ids, blocks, gguf_type, width)


def gguf_dequantize(blocks: torch.Tensor, gguf_type: int, width: int, packed: bool = False) -> torch.Tensor:
    """GGUF blocks [N, row bytes] (or `gguf_pack`'s layout) -> float32 [N, width]."""
    return _kernel().gguf_dequantize(blocks, gguf_type, width, packed)
