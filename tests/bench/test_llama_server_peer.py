"""lmkernel.bench.llama_server_peer: the build flags for a CPU, building llama-server once from the sdist (cmake faked), its command line."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

import pytest

from lmkernel.bench import llama_server_peer
from lmkernel.errors import LmkError

VERSION = "0.3.36"


def test_peer_build_leaves_out_amx_where_the_cpu_reports_it() -> None:
    flags = Path("/proc/cpuinfo").read_text().split()
    chosen = llama_server_peer.default_cmake_flags()
    if "amx_int8" in flags:  # llama.cpp's AMX path faults at ldtilecfg on some virtual machines
        assert chosen == llama_server_peer.NO_AMX_FLAGS and "GGML_NATIVE=OFF" in chosen
    else:
        assert chosen == llama_server_peer.NATIVE_FLAGS


def test_a_peer_that_exits_is_reported_with_its_log(tmp_path: Path) -> None:
    with pytest.raises(LmkError, match="exited with"):
        llama_server_peer.start_llama_server(Path("/bin/false"), tmp_path / "m.gguf", 2, 1, 1, tmp_path / "log")


@pytest.mark.parametrize(("text", "expected"), [
    ("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_vnni amx_bf16 amx_tile amx_int8\n", llama_server_peer.NO_AMX_FLAGS),
    ("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_vnni amx_bf16 amx_tile\n", llama_server_peer.NATIVE_FLAGS),
    ("processor\t: 0\nflags\t\t: fpu amx_int8x\n", llama_server_peer.NATIVE_FLAGS),
    (None, llama_server_peer.NATIVE_FLAGS),
])
def test_the_default_build_drops_amx_only_on_a_cpu_reporting_amx_int8(monkeypatch, tmp_path: Path, text, expected) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    if text is not None:
        cpuinfo.write_text(text)
    monkeypatch.setattr(llama_server_peer, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else Path(p))
    assert llama_server_peer.default_cmake_flags() == expected


def test_without_llama_cpp_python_the_error_names_the_extra_and_peer_binary(monkeypatch) -> None:
    def version(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(llama_server_peer.metadata, "version", version)
    with pytest.raises(LmkError) as err:
        llama_server_peer.source_version()
    assert str(err.value) == ("the llama.cpp peer is not installed: pip install -e '.[bench]' (its sdist carries the "
                              "llama.cpp source llama-server is built from), or pass --peer-binary")


@pytest.fixture
def peers(monkeypatch, tmp_path: Path) -> Path:
    """PEERS_DIR in tmp_path, llama-cpp-python VERSION 'installed', and its sdist there with the vendored
    llama.cpp beside a file outside it."""
    root = tmp_path / "peers"
    root.mkdir()
    monkeypatch.setattr(llama_server_peer, "PEERS_DIR", root)
    monkeypatch.setattr(llama_server_peer.metadata, "version",
                        lambda name: VERSION if name == "llama-cpp-python" else metadata.version(name))
    with tarfile.open(root / f"llama_cpp_python-{VERSION}.tar.gz", "w:gz") as tar:
        for name, body in ((f"llama_cpp_python-{VERSION}/setup.py", b"outside"),
                           (f"llama_cpp_python-{VERSION}/vendor/llama.cpp/CMakeLists.txt", b"project(llama.cpp)"),
                           (f"llama_cpp_python-{VERSION}/vendor/llama.cpp/tools/server/server.cpp", b"int main() {}")):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return root


def fake_run(monkeypatch, ran: list[list[str]], binary: Path | None, fail_at: int | None = None) -> None:
    """subprocess.run for the build: records each command; the --build step writes `binary`; command `fail_at`
    exits 1."""
    def run(cmd, **kwargs):
        ran.append(cmd)
        if len(ran) - 1 == fail_at:
            return subprocess.CompletedProcess(cmd, 1, "cmake out", "CMake Error: no compiler")
        if "--build" in cmd and binary is not None:
            binary.parent.mkdir(parents=True)
            binary.write_text("ELF")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(llama_server_peer.subprocess, "run", run)


def test_llama_server_is_built_once_from_the_vendored_source_with_the_given_flags(monkeypatch, peers: Path) -> None:
    root = peers / f"llama-server-{VERSION}-9c04b2f269"  # sha256("-DX=ON -DY=OFF")[:10]
    binary = root / "build" / "bin" / "llama-server"
    ran, logged = [], []
    fake_run(monkeypatch, ran, binary)
    assert llama_server_peer.build_llama_server("-DX=ON -DY=OFF", jobs=3, log=logged.append) == binary
    src, build = root / "src", root / "build"
    assert sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()) == [
        "CMakeLists.txt", "tools/server/server.cpp"]
    assert ran == [
        ["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
         "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DX=ON", "-DY=OFF"],
        ["cmake", "--build", str(build), "--target", "llama-server", "-j", "3"],
    ]
    assert logged == [f"building llama-server {VERSION} (-DX=ON -DY=OFF) in {root}: several minutes, once"]
    ran.clear()
    assert llama_server_peer.build_llama_server("-DX=ON -DY=OFF", jobs=3, log=logged.append) == binary
    assert ran == [] and len(logged) == 1


def test_a_failed_build_shows_the_command_and_its_output(monkeypatch, peers: Path) -> None:
    ran = []
    fake_run(monkeypatch, ran, None, fail_at=0)
    with pytest.raises(LmkError) as err:
        llama_server_peer.build_llama_server("-DX=ON", jobs=2, log=lambda line: None)
    message = str(err.value)
    assert message.startswith("building llama-server failed (cmake -S ") and "-DX=ON)" in message
    assert message.endswith(":\ncmake outCMake Error: no compiler") and len(ran) == 1


def test_a_build_that_leaves_no_binary_is_an_error(monkeypatch, peers: Path) -> None:
    fake_run(monkeypatch, [], None)
    with pytest.raises(LmkError) as err:
        llama_server_peer.build_llama_server("-DX=ON", jobs=2, log=lambda line: None)
    assert str(err.value) == ("the llama-server build finished without "
                              f"{peers}/llama-server-{VERSION}-df8bfc9c4e/build/bin/llama-server")  # sha256("-DX=ON")[:10]


def test_the_sdist_is_fetched_by_pip_and_a_failed_fetch_is_reported(monkeypatch, tmp_path: Path) -> None:
    ran = []

    def run(cmd, **kwargs):
        ran.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: no network")

    monkeypatch.setattr(llama_server_peer.subprocess, "run", run)
    into = tmp_path / "peers"
    with pytest.raises(LmkError) as err:
        llama_server_peer._sdist(VERSION, into)
    assert str(err.value) == f"could not fetch the llama-cpp-python {VERSION} sdist from the package registry:\nERROR: no network"
    assert ran == [[sys.executable, "-m", "pip", "download", f"llama-cpp-python=={VERSION}", "--no-deps", "--no-binary",
                    ":all:", "-d", str(into)]]
    (into / f"llama_cpp_python-{VERSION}.tar.gz").write_bytes(b"")
    assert llama_server_peer._sdist(VERSION, into) == into / f"llama_cpp_python-{VERSION}.tar.gz" and len(ran) == 1


def test_the_server_gets_a_slot_per_stream_and_a_context_per_slot(monkeypatch, tmp_path: Path) -> None:
    seen = {}

    def start(args, port, log, name, timeout):
        seen.update(args=args, port=port, log=log, name=name, timeout=timeout)
        return "started"

    monkeypatch.setattr(llama_server_peer, "start_http_process", start)
    got = llama_server_peer.start_llama_server(Path("/opt/llama-server"), Path("/m/x.gguf"), 6, 4, 8123,
                                               tmp_path / "log", timeout=9.0)
    assert got == "started"
    assert seen == {"args": ["/opt/llama-server", "-m", "/m/x.gguf", "-t", "6", "-tb", "6", "-np", "4", "-c", "4096",
                             "-cb", "--host", "127.0.0.1", "--port", "8123"],
                    "port": 8123, "log": tmp_path / "log", "name": "llama-server", "timeout": 9.0}
