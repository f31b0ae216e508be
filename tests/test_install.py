"""The package as a user installs it: a wheel of this tree, installed into a fresh virtual environment,
quantizes a model (calibrated on text the model generates) and benchmarks it from a directory outside
the repository, so nothing it needs at run time may point into the checkout or its shared data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a wheel build, a venv and a GPTQ run: `make test` runs it, `make test-fast` does not

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str | Path, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    out = subprocess.run([str(a) for a in args], cwd=cwd, env={**env, "COLUMNS": "250"}, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, f"{args}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment holding the wheel of this tree; its dependencies are the project's own .venv
    packages, seen through a path line in a .pth file (no network, no re-install)."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"  # built from a copy, so the build leaves nothing in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "lmkernel", src / "lmkernel", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", src, cwd=tmp)
    wheel = next((tmp / "dist").glob("lmkernel-*.whl"))
    env = tmp / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", env, cwd=tmp)
    python = env / "bin" / "python"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp).stdout.strip())
    # A path line puts the project's site-packages on sys.path after the venv's own. Unlike a site
    # directory, its .pth files are not run: the editable install's finder, which would import lmkernel
    # from this checkout, stays off.
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "lmkernel-test-deps.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel, cwd=tmp)
    return env


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    work = tmp_path / "elsewhere"
    work.mkdir()
    return work


def test_the_installed_package_is_the_one_imported(venv: Path, outside: Path) -> None:
    code = ("import lmkernel, lmkernel.cli, lmkernel.bench.workload as w; print(lmkernel.__file__); "
            "print(w.SHARED_DATA.exists()); print(len(w.bench_text()))")
    path, shared, text = _run(venv / "bin" / "python", "-c", code, cwd=outside).stdout.split()
    assert Path(path).is_relative_to(venv) and not Path(path).is_relative_to(REPO), path
    assert shared == "False" and int(text) > 15_000
    assert "quantize" in _run(venv / "bin" / "lmk", "--help", cwd=outside).stdout


def test_quantize_calibrates_on_generated_text(venv: Path, outside: Path) -> None:
    out_dir = outside / "smollm-int4"
    # The default calibration (sequences the model generates), kept short: 4 sequences, 1 refinement step,
    # and only the last layer in int4 (GPTQ over all 30 layers takes minutes here).
    float_layers = ("--skip", "lm_head", "--skip", "model.layers.[0-9].*", "--skip", "model.layers.1?.*",
                    "--skip", "model.layers.2[0-8].*")
    out = _run(venv / "bin" / "lmk", "quantize", "smollm2-135m-instruct", "--method", "int4", "--calibration-sequences", "4",
               "--refine-steps", "1", *float_layers, "-o", out_dir, cwd=outside)
    assert "generating 4 sequences of 128 tokens" in out.stderr
    assert "7 linear layers quantized" in out.stdout and "over 1 steps" in out.stdout
    config = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    assert config["method"] == "int4" and config["rounding"] == "gptq" and config["refine_steps"] == 1
    assert all(m.startswith("model.layers.29.") for m in config["quantized_modules"])
    assert (out_dir / "model.safetensors").stat().st_size > 50e6


def test_bench_throughput_reads_the_packaged_text(venv: Path, outside: Path) -> None:
    out = _run(venv / "bin" / "lmk", "bench", "throughput", "--num-requests", "4", "--min-prompt", "16", "--max-prompt", "64",
               "--min-output", "4", "--max-output", "8", "--hf-batch-size", "0", "--kv-cache-memory", "64MiB",
               "--device", "cpu", cwd=outside)
    assert "4 requests" in out.stdout and "lmkernel:" in out.stdout and "tok/s" in out.stdout
