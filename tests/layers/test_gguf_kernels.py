"""The GGUF block kernels against the gguf package's dequantization, on random blocks of every type."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from lmkernel.layers import cpu_kernels
from lmkernel.layers.linear import GGUFEmbedding, GGUFLinear

T = gguf.GGMLQuantizationType
LEGACY = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)
K_QUANTS = (T.Q4_K, T.Q5_K, T.Q6_K)
FLOATS = (T.F32, T.F16, T.BF16)


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert cpu_kernels.build(), "the CPU kernels should compile on this machine"


@pytest.fixture(params=["amx", "vector"])
def tiles(request: pytest.FixtureRequest) -> str:
    """Products of 8 and more rows on AMX tiles, then on the vector kernels (VNNI / AVX-512 / AVX2), in
    the native build; the AMX run says why where the machine does not grant tiles."""
    kernel = cpu_kernels.library("native")
    if request.param == "amx" and not kernel.amx_usable():
        pytest.skip(f"AMX tiles are not usable on this machine: {kernel.amx_status()}")
    kernel.amx_enable(request.param == "amx")
    yield request.param
    kernel.amx_enable(True)


def random_blocks(qtype: T, rows: int, width: int, seed: int) -> np.ndarray:
    """uint8 [rows, bytes of a row] of valid blocks: quantized Gaussian weights where the gguf package can
    quantize to the type, else random bytes with small positive float16 scales (k-quants)."""
    rng = np.random.default_rng(seed)
    if qtype == T.F32:
        return rng.standard_normal((rows, width)).astype(np.float32).view(np.uint8)
    if qtype in FLOATS or qtype in LEGACY:
        return np.ascontiguousarray(gguf.quants.quantize(rng.standard_normal((rows, width)).astype(np.float32) * 0.05,
                                                         qtype)).view(np.uint8).reshape(rows, -1)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * width // block, size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.02, size=(len(blocks), 2)).astype(np.float16).view(np.uint8)
    if qtype == T.Q6_K:
        blocks[:, -2:] = scales[:, :2]
    else:  # d and dmin open Q4_K / Q5_K blocks
        blocks[:, 0:4] = scales
    return blocks.reshape(rows, width // block * size)


def reference(blocks: np.ndarray, qtype: T, width: int) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(blocks, qtype).astype(np.float32)).reshape(blocks.shape[0], width)


def exact_activations(rows: int, width: int, block: int, seed: int) -> torch.Tensor:
    """Rows that the kernels' activation quantization represents exactly (d (q + r / 64) with |q| <= 127
    and |r| < 32 for legacy types' blocks of 32; r = 0 for k-quants' blocks of 256, which take 8 bits;
    each block reaching 127 d), so their integer arithmetic can be held to the float product exactly."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (rows, width // block, block), generator=g).double()
    r = torch.randint(-31, 32, (rows, width // block, block), generator=g).double() * (block == 32)
    q[..., 0], r[..., 0] = 127, 0
    scale = torch.rand(rows, width // block, 1, generator=g).double() + 0.01
    return ((q + r / 64) * scale).reshape(rows, width).float()


@pytest.mark.parametrize("qtype", [*LEGACY, *K_QUANTS, *FLOATS], ids=lambda t: t.name)
def test_dequantize_and_embedding_rows_equal_the_gguf_package(qtype: T) -> None:
    width = 512
    blocks = random_blocks(qtype, 37, width, seed=int(qtype))
    expected = reference(blocks, qtype, width)
    stored = torch.from_numpy(blocks.copy())
    assert torch.equal(cpu_kernels.gguf_dequantize(stored, int(qtype), width), expected)
    ids = torch.tensor([5, 0, 36, 5])
    assert torch.equal(cpu_kernels.gguf_embedding(ids, stored, int(qtype), width), expected[ids])


# Rows 1-7 run the decode kernels (one weight row a stream); from 8 on AMX tiles where granted, else
# 8-16 the decode kernels and 17 and more the prefill kernels (tiles repacked once, where the CPU has
# them). 41 weight rows: a partial tile, and an odd row at its end.
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 16, 17, 70])
@pytest.mark.parametrize("qtype", [*LEGACY, *K_QUANTS], ids=lambda t: t.name)
def test_linear_equals_the_product_of_dequantized_weights_and_quantized_activations(qtype: T, rows: int, tiles: str) -> None:
    width = 768 if qtype in LEGACY else 512  # 768 = 24 blocks of 32: a span of 64 is two of them
    blocks = torch.from_numpy(random_blocks(qtype, 41, width, seed=rows))
    block = 32 if qtype in LEGACY else 256
    x = exact_activations(rows, width, block, seed=rows)
    bias = torch.randn(41)
    got = cpu_kernels.gguf_linear(x, blocks, int(qtype), bias)
    expected = (x.double() @ reference(blocks.numpy(), qtype, width).double().T + bias.double()).float()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("qtype", [*LEGACY, *K_QUANTS], ids=lambda t: t.name)
def test_prefill_over_long_rows_equals_the_product(qtype: T, tiles: str) -> None:
    """Rows of 2560 weights (the prefill kernels run a tile against every activation row, 1024 or 2048
    weights at a pass, the passes summed) and 37 activation rows (a remainder after blocks of 8 or 16)."""
    blocks = torch.from_numpy(random_blocks(qtype, 23, 2560, seed=5))
    x = exact_activations(37, 2560, 32 if qtype in LEGACY else 256, seed=5)
    expected = (x.double() @ reference(blocks.numpy(), qtype, 2560).double().T).float()
    torch.testing.assert_close(cpu_kernels.gguf_linear(x, blocks, int(qtype)), expected, rtol=1e-5,
                               atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("rows", [8, 12, 32])
@pytest.mark.parametrize("qtype", [*LEGACY, *K_QUANTS], ids=lambda t: t.name)
def test_batched_decode_product_equals_the_row_kernels(qtype: T, rows: int, tiles: str) -> None:
    """A decode step of 8-32 sequences reads each weight once for all of them (tiles, or the prefill
    kernel); on activations both represent exactly it gives what the one-to-four-row kernels give."""
    width = 1024 if qtype in LEGACY else 1536
    blocks = torch.from_numpy(random_blocks(qtype, 300, width, seed=rows))
    x = exact_activations(rows, width, 32 if qtype in LEGACY else 256, seed=rows + 1)
    by_rows = torch.cat([cpu_kernels.gguf_linear(x[i : i + 4].contiguous(), blocks, int(qtype)) for i in range(0, rows, 4)])
    batched = cpu_kernels.gguf_linear(x, blocks, int(qtype))
    torch.testing.assert_close(batched, by_rows, rtol=1e-5, atol=1e-5 * by_rows.abs().max().item())


@pytest.mark.parametrize("qtype", [*LEGACY, *K_QUANTS], ids=lambda t: t.name)
def test_each_row_is_the_same_bits_whatever_rows_share_the_call(qtype: T, tiles: str) -> None:
    """Up to 7 rows (a decode step) always, and any number with `invariant` (--deterministic): a row's result
    does not depend on the rows beside it, packed or stored."""
    width = 1024 if qtype in LEGACY else 1536
    blocks = torch.from_numpy(random_blocks(qtype, 64, width, seed=3))
    layers = [blocks]
    if qtype in (T.Q4_K, T.Q6_K):
        layers.append(cpu_kernels.gguf_pack(blocks, int(qtype), width))
    x = torch.randn(70, width, generator=torch.Generator().manual_seed(4))
    for w in layers:
        packed = w is not blocks
        alone = torch.cat([cpu_kernels.gguf_linear(x[i : i + 1], w, int(qtype), packed=packed) for i in range(70)])
        for rows in range(2, 8):
            assert torch.equal(cpu_kernels.gguf_linear(x[:rows], w, int(qtype), packed=packed), alone[:rows]), rows
        for rows in (8, 16, 33, 70):
            got = cpu_kernels.gguf_linear(x[:rows], w, int(qtype), packed=packed, invariant=True)
            assert torch.equal(got, alone[:rows]), rows


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda t: t.name)
def test_packed_layout_restores_the_stored_rows_exactly(qtype: T) -> None:
    blocks = torch.from_numpy(random_blocks(qtype, 48, 768 if qtype != T.Q6_K else 1024, seed=9))
    if int(qtype) not in (12, 14):
        with pytest.raises(RuntimeError, match="has no packed layout"):
            cpu_kernels.gguf_pack(blocks, int(qtype), 768)
        return
    width = blocks.shape[1] // (144 if qtype == T.Q4_K else 210) * 256
    packed = cpu_kernels.gguf_pack(blocks, int(qtype), width)
    assert packed.shape[0] == 3  # groups of 16 rows
    assert torch.equal(cpu_kernels.gguf_dequantize(packed, int(qtype), width, packed=True), reference(blocks.numpy(), qtype, width))
    with pytest.raises(RuntimeError, match="do not fill groups of 16"):
        cpu_kernels.gguf_pack(blocks[:40].contiguous(), int(qtype), width)
    with pytest.raises(RuntimeError, match="expected size"):
        cpu_kernels.gguf_linear(torch.randn(1, width), packed[:, :-1].contiguous(), int(qtype), packed=True)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 16, 17, 40])
@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_packed_rows_equal_the_product(qtype: T, rows: int, tiles: str) -> None:
    """The decode layout (16 rows interleaved) in every path that reads it: its own decode kernel (1-15
    rows; without tiles up to 63), AMX tiles reading it in place (16 and more) and restored for the prefill
    kernel (64 and more, without tiles); a batched product equals the decode kernel's four rows at a time."""
    width = 1536
    blocks = torch.from_numpy(random_blocks(qtype, 64, width, seed=rows))
    packed = cpu_kernels.gguf_pack(blocks, int(qtype), width)
    x = exact_activations(rows, width, 256, seed=rows)
    bias = torch.randn(64)
    expected = (x.double() @ reference(blocks.numpy(), qtype, width).double().T + bias.double()).float()
    got = cpu_kernels.gguf_linear(x, packed, int(qtype), bias, packed=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4 * expected.abs().max().item())
    torch.testing.assert_close(got, cpu_kernels.gguf_linear(x, blocks, int(qtype), bias), rtol=1e-5,
                               atol=1e-5 * expected.abs().max().item())
    by_rows = torch.cat([cpu_kernels.gguf_linear(x[i : i + 4].contiguous(), packed, int(qtype), bias, packed=True)
                         for i in range(0, rows, 4)])
    torch.testing.assert_close(got, by_rows, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_batched_steps_get_a_prompts_integer_sums(qtype: T, tiles: str) -> None:
    """From 8 rows a call on, k-quant activations carry 8 bits alone, as a prompt's do: a decode step of
    8-15 rows on the packed rows' vector kernel gives each row what a prompt's product (tiles, or the
    prefill kernel) gives it, to float rounding; one row alone keeps 8 + 6 bits and is nearer the float
    product."""
    blocks = torch.from_numpy(random_blocks(qtype, 64, 1536, seed=7))
    packed = cpu_kernels.gguf_pack(blocks, int(qtype), 1536)
    x = torch.randn(40, 1536, generator=torch.Generator().manual_seed(7))
    exact = x.double() @ reference(blocks.numpy(), qtype, 1536).double().T
    prompt = cpu_kernels.gguf_linear(x, blocks, int(qtype))
    for rows in (8, 12):
        step = cpu_kernels.gguf_linear(x[:rows].contiguous(), packed, int(qtype), packed=True)
        torch.testing.assert_close(step, prompt[:rows], rtol=1e-5, atol=1e-5 * prompt.abs().max().item())
    single = cpu_kernels.gguf_linear(x[:1].contiguous(), packed, int(qtype), packed=True).double()
    assert (single - exact[:1]).norm() < 0.2 * (prompt[:1].double() - exact[:1]).norm()


def test_layers_pack_at_load_and_run_as_before() -> None:
    blocks = torch.from_numpy(random_blocks(T.Q4_K, 32, 512, seed=2))
    layer = GGUFLinear(512, 32, bias=False, gguf_type=int(T.Q4_K), row_bytes=blocks.shape[1])
    layer.blocks = blocks
    x = torch.randn(3, 512)
    before, weight = layer(x), layer.dequantized()
    assert layer.pack() and layer.packed and not layer.pack()  # once
    assert layer.blocks.shape == (2, 2 * 16 * 160)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.dequantized(), weight)
    odd = GGUFLinear(512, 24, bias=False, gguf_type=int(T.Q4_K), row_bytes=blocks.shape[1])
    odd.blocks = blocks[:24].contiguous()
    assert not odd.pack() and not odd.packed  # 24 rows: no whole groups of 16


def test_amx_tiles_are_chosen_where_granted_and_switched_by_select() -> None:
    kernel = cpu_kernels.library("native")
    try:
        if kernel.amx_usable():
            assert cpu_kernels.select("auto") == "amx" and kernel.amx_active()
            assert cpu_kernels.select("amx") == "amx"
        else:
            assert cpu_kernels.select("auto") == kernel.isa() and not kernel.amx_active()
            with pytest.raises(RuntimeError, match="AMX tiles are not usable here"):
                cpu_kernels.select("amx")
        if kernel.isa() == "avx512-vnni":
            assert cpu_kernels.select("avx512-vnni") == "avx512-vnni" and not kernel.amx_active()
        with pytest.raises(ValueError, match="CPU path must be one of"):
            cpu_kernels.select("sse2")
    finally:
        cpu_kernels.select("auto")
    assert cpu_kernels.amx_status()


@pytest.mark.parametrize("qtype", FLOATS, ids=lambda t: t.name)
def test_float_blocks_multiply_in_float(qtype: T) -> None:
    blocks = torch.from_numpy(random_blocks(qtype, 19, 200, seed=1))
    x = torch.randn(3, 200)
    expected = x @ reference(blocks.numpy(), qtype, 200).T
    torch.testing.assert_close(cpu_kernels.gguf_linear(x, blocks, int(qtype)), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("qtype", "rows", "bound"), [
    (T.Q5_0, 1, 5e-4), (T.Q8_0, 1, 5e-4), (T.Q4_K, 1, 5e-4), (T.Q6_K, 1, 5e-4),
    (T.Q5_0, 40, 2e-4), (T.Q8_0, 40, 2e-4), (T.Q4_K, 40, 0.02), (T.Q6_K, 40, 0.02),
    (T.Q4_K, 8, 0.02), (T.Q6_K, 8, 0.02),
], ids=lambda v: getattr(v, "name", str(v)))
def test_activation_precision_of_each_family(qtype: T, rows: int, bound: float, tiles: str) -> None:
    """Gaussian activations (not exactly representable). Rows of a call of 1-7 (8 + 6 bits per block for
    every type) and legacy rows of any number (8 + 6 bits per 32) keep the product within 5e-4 of float
    (about 1e-4 typically); k-quant calls of 8 rows and more (8 bits per 256, llama.cpp's precision: batched
    decode steps and prompts) within 2% (about 0.7%).
    Seeded: one row's error varies by 2x from row to row."""
    blocks = torch.from_numpy(random_blocks(qtype, 64, 1536, seed=3))
    x = torch.randn(rows, 1536, generator=torch.Generator().manual_seed(rows))
    expected = x.double() @ reference(blocks.numpy(), qtype, 1536).double().T
    error = (cpu_kernels.gguf_linear(x, blocks, int(qtype)).double() - expected).norm() / expected.norm()
    assert 1e-6 < error < bound  # quantized (not exact), and as precise as promised


def test_layers_over_blocks_run_like_their_float_weights() -> None:
    blocks = torch.from_numpy(random_blocks(T.Q8_0, 48, 256, seed=4))
    weight = reference(blocks.numpy(), T.Q8_0, 256)
    layer = GGUFLinear(256, 48, bias=False, gguf_type=int(T.Q8_0), row_bytes=blocks.shape[1])
    layer.blocks = blocks
    x = exact_activations(6, 256, 32, seed=5).reshape(2, 3, 256)
    expected = x @ weight.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-4 * expected.abs().max().item())
    torch.testing.assert_close(layer.dequantized(), weight)
    table = GGUFEmbedding(48, 256, int(T.Q8_0), blocks.shape[1])
    table.blocks = blocks
    assert torch.equal(table(torch.tensor([[1, 2], [47, 0]])), weight[torch.tensor([[1, 2], [47, 0]])])


def test_wrong_arguments_raise_instead_of_reading_past_a_buffer() -> None:
    blocks = torch.from_numpy(random_blocks(T.Q4_K, 8, 512, seed=6))
    with pytest.raises(RuntimeError, match="is not a whole number of blocks"):
        cpu_kernels.gguf_linear(torch.randn(1, 500), blocks, int(T.Q4_K))
    with pytest.raises(RuntimeError, match="expected size"):
        cpu_kernels.gguf_linear(torch.randn(1, 768), blocks, int(T.Q4_K))
    with pytest.raises(RuntimeError, match="dtype"):
        cpu_kernels.gguf_linear(torch.randn(1, 512, dtype=torch.float64), blocks, int(T.Q4_K))
    with pytest.raises(RuntimeError, match="contiguous"):
        cpu_kernels.gguf_linear(torch.randn(512, 2).T, blocks, int(T.Q4_K))
    with pytest.raises(RuntimeError, match="has no kernel"):
        cpu_kernels.gguf_linear(torch.randn(1, 512), blocks, int(T.Q2_K))
    with pytest.raises(RuntimeError, match="outside"):
        cpu_kernels.gguf_embedding(torch.tensor([8]), blocks, int(T.Q4_K), 512)
    assert cpu_kernels.gguf_block_layout(int(T.Q2_K)) is None
    assert cpu_kernels.gguf_block_layout(int(T.Q4_K)) == (256, 144)


def test_int8_peak_is_the_units_rate() -> None:
    """The compute limit `lmk bench serve` prints: vectors reach a plausible int8 rate, and tiles (where
    granted) several times that, as an AMX unit's 16 x 16 x 64 product a few cycles should."""
    kernel = cpu_kernels.library("native")
    vector = cpu_kernels.int8_peak(False, seconds=0.1)
    if kernel.isa() != "avx512-vnni":
        assert vector == 0.0
        pytest.skip(f"no 512-bit VNNI in this build ({kernel.isa()})")
    assert 1e10 < vector < 1e13
    if not kernel.amx_usable():
        assert cpu_kernels.int8_peak(True, seconds=0.1) == 0.0
        pytest.skip(f"AMX tiles are not usable on this machine: {kernel.amx_status()}")
    assert cpu_kernels.int8_peak(True, seconds=0.1) > 2 * vector
