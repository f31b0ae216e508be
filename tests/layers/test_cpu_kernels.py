"""The compiled CPU kernels against the PyTorch operations they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmkernel.layers import cpu_kernels
from lmkernel.layers.linear import dense


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert cpu_kernels.build(), "the CPU kernels should compile on this machine"


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(576, 576), (1536, 576), (131, 77)])  # 131 x 77: tails of every loop
def test_small_linear_float32_matches_linear(rows: int, shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(shape, generator=g)
    b = torch.randn(shape[0], generator=g)
    x = torch.randn(rows, shape[1], generator=g)
    with torch.inference_mode():
        for bias in (None, b):
            got = cpu_kernels.small_linear(x, w, bias)
            assert got.shape == (rows, shape[0]) and got.dtype == torch.float32
            torch.testing.assert_close(got, F.linear(x, w, bias), rtol=1e-5, atol=1e-4)


def test_small_linear_bfloat16_accumulates_in_float32() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=g).bfloat16()
    x = torch.randn(3, 200, generator=g).bfloat16()
    with torch.inference_mode():
        got = cpu_kernels.small_linear(x, w, None)
    assert got.dtype == torch.bfloat16
    exact = (x.float() @ w.float().T).bfloat16()
    assert (got.float() - exact.float()).abs().max() <= 0.05 * exact.float().abs().max()


def test_small_linear_declines_what_pytorch_should_do() -> None:
    w = torch.randn(8, 16)
    with torch.inference_mode():
        assert cpu_kernels.small_linear_applies(torch.randn(4, 16), w)
        assert not cpu_kernels.small_linear_applies(torch.randn(5, 16), w)  # a matrix product, not streaming
        assert not cpu_kernels.small_linear_applies(torch.randn(1, 16).bfloat16(), w.bfloat16())
        assert cpu_kernels.small_linear_applies(torch.randn(2, 16).bfloat16(), w.bfloat16())
    assert not cpu_kernels.small_linear_applies(torch.randn(1, 16), w.requires_grad_())  # needs autograd


def test_dense_layer_trains_and_decodes_the_same() -> None:
    torch.manual_seed(0)
    layer = dense(64, 32, bias=True)
    x = torch.randn(2, 64)
    with torch.inference_mode():
        fast = layer(x)
    slow = layer(x)  # autograd on: PyTorch's path
    slow.sum().backward()
    assert layer.weight.grad is not None
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 5, 16, 300])  # 300: a prefill, split over the threads
def test_rms_norm_rotary_and_silu_mul_match_pytorch(rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 576, generator=g), torch.rand(576, generator=g)
    torch.testing.assert_close(cpu_kernels.rms_norm(x, w, 1e-5), F.rms_norm(x, (576,), w, 1e-5))
    q, cos, sin = torch.randn(rows, 9, 64, generator=g), torch.randn(rows, 64, generator=g), torch.randn(rows, 64, generator=g)
    rotated = torch.cat((-q[..., 32:], q[..., :32]), dim=-1)
    torch.testing.assert_close(cpu_kernels.rotary(q, cos, sin), q * cos[:, None] + rotated * sin[:, None])
    gate, up = torch.randn(rows, 1536, generator=g) * 4, torch.randn(rows, 1536, generator=g)
    torch.testing.assert_close(cpu_kernels.silu_mul(gate, up), F.silu(gate) * up)


def test_fused_elementwise_kernels_decline_grad_and_other_dtypes() -> None:
    w = torch.rand(8)
    assert cpu_kernels.silu_mul_applies(torch.randn(2, 8), torch.randn(2, 8))
    assert not cpu_kernels.silu_mul_applies(torch.randn(2, 8), torch.randn(2, 7))
    assert cpu_kernels.rms_norm_applies(torch.randn(2, 8), w)
    assert not cpu_kernels.rms_norm_applies(torch.randn(2, 8, dtype=torch.bfloat16), w)
    assert not cpu_kernels.rms_norm_applies(torch.randn(2, 8, requires_grad=True), w)
    assert cpu_kernels.rotary_applies(torch.randn(3, 2, 8), torch.randn(3, 8), torch.randn(3, 8))
    assert not cpu_kernels.rotary_applies(torch.randn(2, 3, 8).transpose(0, 1), torch.randn(3, 8), torch.randn(3, 8))


@pytest.mark.parametrize("threads", [1, 4])  # 4: batch-1 contexts are cut into spans and merged
@pytest.mark.parametrize("lengths", [[1], [37], [1000], [5, 300], [17, 16, 1, 250, 64]])
def test_paged_decode_matches_attention_over_the_gathered_context(lengths: list[int], threads: int) -> None:
    g = torch.Generator().manual_seed(len(lengths))
    block, blocks, heads, kv_heads, dim = 16, 128, 9, 3, 64
    k_cache = torch.randn(blocks * block, kv_heads, dim, generator=g)
    v_cache = torch.randn(blocks * block, kv_heads, dim, generator=g)
    tables = [torch.randperm(blocks, generator=g)[: -(-n // block)].tolist() for n in lengths]  # scattered blocks
    width = max(len(t) for t in tables)
    q = torch.randn(len(lengths), heads, dim, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the kernel's OpenMP runtime is torch's
    try:
        got = cpu_kernels.paged_decode(q, k_cache, v_cache, torch.tensor([t + [0] * (width - len(t)) for t in tables]),
                                       torch.tensor(lengths), block, 0.125)
    finally:
        torch.set_num_threads(before)
    for i, (n, table) in enumerate(zip(lengths, tables)):
        slots = torch.tensor(table)[torch.arange(n) // block] * block + torch.arange(n) % block
        ref = F.scaled_dot_product_attention(q[i][:, None], k_cache[slots].transpose(0, 1), v_cache[slots].transpose(0, 1),
                                             scale=0.125, enable_gqa=True)
        torch.testing.assert_close(got[i], ref[:, 0], rtol=1e-5, atol=1e-5)
