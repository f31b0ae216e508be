"""llama.cpp's own `llama-server`, the peer for serving: built once from the llama.cpp source vendored in
the `bench` extra's llama-cpp-python (its sdist, from the package registry), run with its best settings
for the work (same threads, one slot per stream, continuous batching)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess  # nosec B404  # runs our own commands as argument lists, never a shell
import sys
import tarfile
from importlib import metadata
from pathlib import Path

from lmkernel.bench.processes import HttpProcess, start_http_process
from lmkernel.errors import LmkError

PEERS_DIR = Path.home() / ".cache" / "lmkernel" / "peers"
CONTEXT_PER_SLOT = 1024

# llama.cpp's AMX path dies at its first `ldtilecfg` on some virtual machines (see PEERS.md): on a CPU
# that reports AMX, build for AVX-512 VNNI without it, as the latency peer is built.
NO_AMX_FLAGS = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON "
                "-DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON")
NATIVE_FLAGS = "-DGGML_NATIVE=ON"


def default_cmake_flags() -> str:
    """The peer's best build that runs here: native, except without AMX on a CPU that reports it."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return NO_AMX_FLAGS if "amx_int8" in flags else NATIVE_FLAGS


def source_version() -> str:
    """The installed llama-cpp-python's version: the server is built from the same llama.cpp source."""
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        raise LmkError("the llama.cpp peer is not installed: pip install -e '.[bench]' (its sdist carries the "
                       "llama.cpp source llama-server is built from), or pass --peer-binary") from None


def _sdist(version: str, into: Path) -> Path:
    name = f"llama_cpp_python-{version}.tar.gz"
    path = into / name
    if not path.is_file():
        into.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps",  # nosec B603  # an argument list this module builds, no shell
                               "--no-binary", ":all:", "-d", str(into)], capture_output=True, text=True)
        if done.returncode != 0 or not path.is_file():
            raise LmkError(f"could not fetch the llama-cpp-python {version} sdist from the package registry:\n"
                           f"{done.stderr[-2000:]}")
    return path


def build_llama_server(cmake_flags: str | None = None, jobs: int = 2, log=print) -> Path:
    """The `llama-server` binary for these flags, built on first use (about 15 min on two cores) and kept
    under ~/.cache/lmkernel/peers."""
    flags = cmake_flags if cmake_flags is not None else default_cmake_flags()
    version = source_version()
    tag = hashlib.sha256(flags.encode()).hexdigest()[:10]
    root = PEERS_DIR / f"llama-server-{version}-{tag}"
    binary = root / "build" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    sdist = _sdist(version, PEERS_DIR)
    source = root / "src"
    if not (source / "CMakeLists.txt").is_file():
        shutil.rmtree(source, ignore_errors=True)
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(source, members=[m for m in members if m.name], filter="data")
    log(f"building llama-server {version} ({flags}) in {root}: several minutes, once")
    build = root / "build"
    for cmd in (["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                 "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", *flags.split()],
                ["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)]):
        done = subprocess.run(cmd, capture_output=True, text=True)  # nosec B603  # an argument list this module builds, no shell
        if done.returncode != 0:
            raise LmkError(f"building llama-server failed ({' '.join(cmd)}):\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    if not binary.is_file():
        raise LmkError(f"the llama-server build finished without {binary}")
    return binary


def start_llama_server(binary: Path, model: Path, threads: int, slots: int, port: int, log: Path,
                       timeout: float = 300.0) -> HttpProcess:
    """Start `binary` on `model` with `slots` parallel sequences (continuous batching), one slot per stream,
    and wait until it answers."""
    args = [str(binary), "-m", str(model), "-t", str(threads), "-tb", str(threads), "-np", str(slots),
            "-c", str(CONTEXT_PER_SLOT * slots), "-cb", "--host", "127.0.0.1", "--port", str(port)]
    return start_http_process(args, port, log, "llama-server", timeout)
