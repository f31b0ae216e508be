"""The narrower builds of the CPU kernels (AVX-512 without VNNI, AVX2) on this machine, against the
dequantized float product: every decode and prefill code path is held to its reference on every
machine that can run it, not only on the CPU that chose it. Slow: each build compiles once a machine."""

from __future__ import annotations

import pytest
import torch
from test_gguf_kernels import K_QUANTS, LEGACY, T, exact_activations, random_blocks, reference

from lmkernel.layers import cpu_kernels

pytestmark = pytest.mark.slow


def _runs(flag: str) -> bool:
    with open("/proc/cpuinfo") as f:
        return flag in next((line for line in f if line.startswith("flags")), "").split()


BUILDS = [("avx2", "avx2", "avx2"), ("avx512", "avx512bw", "avx512")]


@pytest.fixture(scope="module", params=BUILDS, ids=[b[0] for b in BUILDS])
def narrow(request: pytest.FixtureRequest) -> object:
    build, flag, isa = request.param
    if not _runs(flag):
        pytest.skip(f"this CPU has no {flag}: the {build} build cannot run here")
    kernel = cpu_kernels.library(build)
    assert kernel is not None, f"the {build} kernels should compile on this machine"
    assert kernel.isa() == isa and not kernel.amx_usable()
    return kernel


@pytest.mark.parametrize("rows", [1, 3, 4, 8, 17, 40])
@pytest.mark.parametrize("qtype", [*LEGACY, *K_QUANTS], ids=lambda t: t.name)
def test_narrow_build_equals_the_product(narrow: object, qtype: T, rows: int) -> None:
    width = 768 if qtype in LEGACY else 512
    blocks = torch.from_numpy(random_blocks(qtype, 41, width, seed=rows))
    x = exact_activations(rows, width, 32 if qtype in LEGACY else 256, seed=rows)
    got = narrow.gguf_linear(x, blocks, int(qtype), None)
    expected = (x.double() @ reference(blocks.numpy(), qtype, width).double().T).float()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("rows", [1, 3, 4, 8, 17, 70])
@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_narrow_build_decodes_packed_rows(narrow: object, qtype: T, rows: int) -> None:
    """The decode layout on the narrow builds' own packed kernel (AVX2's vpmaddubsw, which the AVX-512 build
    without VNNI runs too): exact on exactly representable rows, and on Gaussian rows the same integer sums
    as the stored rows' kernels (8 + 6 bits below 8 rows a call, 8 from there)."""
    assert narrow.gguf_packed_kernel()
    width = 1536
    blocks = torch.from_numpy(random_blocks(qtype, 64, width, seed=rows))
    packed = narrow.gguf_pack(blocks, int(qtype), width)
    x = exact_activations(rows, width, 256, seed=rows)
    expected = (x.double() @ reference(blocks.numpy(), qtype, width).double().T).float()
    got = narrow.gguf_linear(x, packed, int(qtype), None, True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4 * expected.abs().max().item())
    gauss = torch.randn(rows, width, generator=torch.Generator().manual_seed(rows))
    stored = narrow.gguf_linear(gauss, blocks, int(qtype), None)
    torch.testing.assert_close(narrow.gguf_linear(gauss, packed, int(qtype), None, True), stored, rtol=1e-5,
                               atol=1e-5 * stored.abs().max().item())


def test_select_runs_a_narrow_build_for_the_process(narrow: object) -> None:
    try:
        assert cpu_kernels.select(narrow.isa()) == narrow.isa()
        assert cpu_kernels.current_path() == narrow.isa()
        blocks = torch.from_numpy(random_blocks(T.Q4_K, 16, 256, seed=1))
        x = exact_activations(2, 256, 256, seed=1)
        expected = (x.double() @ reference(blocks.numpy(), T.Q4_K, 256).double().T).float()
        torch.testing.assert_close(cpu_kernels.gguf_linear(x, blocks, int(T.Q4_K)), expected, rtol=1e-5,
                                   atol=1e-4 * expected.abs().max().item())
    finally:
        cpu_kernels.select("auto")


@pytest.mark.parametrize("qtype", [*LEGACY, *K_QUANTS], ids=lambda t: t.name)
def test_narrow_build_rows_do_not_depend_on_their_neighbours(narrow: object, qtype: T) -> None:
    """Up to 7 rows always, any number with `invariant` (--deterministic): each row the bits it gets alone."""
    width = 768 if qtype in LEGACY else 512
    blocks = torch.from_numpy(random_blocks(qtype, 48, width, seed=5))
    x = torch.randn(40, width, generator=torch.Generator().manual_seed(6))
    for packed in (False, True) if qtype in (T.Q4_K, T.Q6_K) else (False,):
        w = narrow.gguf_pack(blocks, int(qtype), width) if packed else blocks
        alone = torch.cat([narrow.gguf_linear(x[i : i + 1], w, int(qtype), None, packed) for i in range(40)])
        for rows in (2, 3, 4, 5, 7):
            assert torch.equal(narrow.gguf_linear(x[:rows], w, int(qtype), None, packed), alone[:rows]), (packed, rows)
        for rows in (8, 17, 40):
            assert torch.equal(narrow.gguf_linear(x[:rows], w, int(qtype), None, packed, True), alone[:rows]), (packed, rows)
