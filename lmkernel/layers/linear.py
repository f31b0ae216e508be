"""Linear layers behind one interface: dense, int8, int4 and GGUF blocks kept as stored (LoRA wraps any of them)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmkernel.layers import cpu_kernels


class Dense(nn.Linear):
    """y = x W^T + b with W stored [out, in] as in Hugging Face checkpoints.

    A few rows on CPU (batch-1 decode) go through the streaming kernel: there the cost is reading
    the weights, which PyTorch's matrix-vector product does at a third of the memory bandwidth.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_kernels.small_linear_applies(x, self.weight):
            return cpu_kernels.small_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class AdapterWrapper(nn.Module):
    """Base of the adapter layers (LoRA, AdaLoRA, IA3, bottleneck): a frozen `base_layer` whose shape it keeps."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)

    def _adopt_mode(self) -> None:
        """Take the base layer's train/eval mode: a wrapper put into an eval model stays in eval mode."""
        self.train(getattr(self.base_layer, "training", False))

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features


def dense(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    """A dense projection layer of the given shape."""
    return Dense(in_features, out_features, bias=bias)


INT4_GROUP_SIZES = (32, 64, 128, 256)
TILE_ROWS = 512
DECODE_ROWS = 16  # up to this many rows (a decode batch) stream the quantized weight, a few rows a pass


def _tiled(x: torch.Tensor, out_features: int, rows: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """x @ W^T with W dequantized TILE_ROWS output rows at a time, so the float weight never exists whole.

    Many rows (prefill) make this compute-bound, where a float matrix product is the fastest there is.
    """
    y = torch.empty(x.shape[0], out_features, dtype=x.dtype, device=x.device)
    for start in range(0, out_features, TILE_ROWS):
        end = min(start + TILE_ROWS, out_features)
        y[:, start:end] = x @ rows(start, end).to(x.dtype).T
    return y


class Int8Linear(nn.Module):
    """Weight-only int8: symmetric, one scale per output channel; y = (x @ q^T) * scale + b. With
    `group_size` (GGUF Q8_0 kept as shipped: 32), one scale per group of input channels instead.

    On CPU, decode rows stream the int8 weight through the compiled kernel and more rows multiply
    tile by tile (`_tiled`); on CUDA it is PyTorch's fused int8-weight kernel (per-channel scales).
    The float weight never exists whole.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float32,
                 group_size: int | None = None) -> None:
        super().__init__()
        if group_size is not None and in_features % group_size:
            raise ValueError(f"int8 group size {group_size} does not divide the input width {in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        scales = (out_features,) if group_size is None else (out_features, in_features // group_size)
        self.register_buffer("weight_scale", torch.ones(*scales, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_float(cls, layer: nn.Linear) -> Int8Linear:
        w = layer.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
        q = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8)
        out = cls(layer.in_features, layer.out_features, layer.bias is not None, layer.weight.dtype)
        out.weight, out.weight_scale = q.to(w.device), scale.to(layer.weight.dtype)
        if layer.bias is not None:
            out.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        return out

    def dequantized(self) -> torch.Tensor:
        """The float weight these int8 values stand for (for tests and export, not for inference)."""
        return self._rows(0, self.out_features)

    def _rows(self, start: int, end: int) -> torch.Tensor:
        q, scale = self.weight[start:end].float(), self.weight_scale[start:end].float()
        if self.group_size is None:
            return q * scale[:, None]
        return (q.view(end - start, -1, self.group_size) * scale[..., None]).view(end - start, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if x.device.type == "cuda" and self.group_size is not None:
            y = _tiled(flat, self.out_features, self._rows)
        elif x.device.type == "cuda":
            y = torch._weight_int8pack_mm(flat, self.weight, self.weight_scale.to(x.dtype))
        else:  # PyTorch's CPU int8 kernel has no fast path without AVX-512: 16x slower than float here
            if flat.shape[0] <= DECODE_ROWS and cpu_kernels.int8_linear_applies(flat):
                # Each pass reads the quantized weight once: at 16 rows, four int8 passes read what one float32
                # pass does, where dequantizing tiles would write and read the float weight again.
                y = torch.cat([cpu_kernels.int8_linear(rows, self.weight, self.weight_scale)
                               for rows in flat.split(cpu_kernels.SMALL_LINEAR_MAX_ROWS)]).to(x.dtype)
            else:
                y = _tiled(flat, self.out_features, self._rows)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


class DynamicInt8Linear(Int8Linear):
    """Dynamic int8 (for encoders): the int8 weight of `Int8Linear`, and the input quantized to int8
    on each call, so the product runs in integers. The stored layout is `Int8Linear`'s.

    On CPU it is PyTorch's fbgemm kernel (activations as one 8-bit range per call; the 7-bit range
    fbgemm offers against AVX2's saturating multiply-add costs MiniLM 0.024 of embedding cosine,
    8 bits 0.007), packed once on first use. `torch._int_mm` is 20x slower than float on this CPU,
    so it serves only CUDA, with each row quantized on its own.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._packed: object | None = None

    def _fbgemm(self) -> object:
        if self._packed is None:
            zero = torch.zeros(self.out_features, dtype=torch.long)
            with warnings.catch_warnings():  # quantized tensors are deprecated, fbgemm's kernels are not
                warnings.simplefilter("ignore", UserWarning)
                q = torch._make_per_channel_quantized_tensor(self.weight, self.weight_scale.double(), zero, 0)
            bias = None if self.bias is None else self.bias.float()
            self._packed = torch.ops.quantized.linear_prepack(q, bias)
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        if x.device.type == "cpu":
            y = torch.ops.quantized.linear_dynamic(flat.contiguous(), self._fbgemm(), False)
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        x_scale = (flat.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
        q = torch.round(flat / x_scale[:, None]).clamp(-127, 127).to(torch.int8)
        if q.shape[0] <= 16:  # torch._int_mm needs more than 16 rows on CUDA; pad a few rows with zeros
            q = torch.nn.functional.pad(q, (0, 0, 0, 17 - q.shape[0]))
        acc = torch._int_mm(q, self.weight.T)[: flat.shape[0]]
        y = acc.float() * x_scale[:, None] * self.weight_scale.float()[None, :]
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def fit_int4_groups(groups: torch.Tensor, rounds: int = 6,
                     importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale, minimum and 4-bit codes per group [..., g] that keep the squared error small.

    Starts from the group's range (round to nearest), then alternates a least-squares fit of scale
    and minimum to the codes with re-rounding the codes, keeping each group's best. On weights that
    were already 4-bit in smaller blocks (a Q4_1 GGUF), the plain range loses a third of the
    perplexity at groups of 64 or 128; the fit recovers most of it. `importance` (broadcast against
    `groups`) weights each element's error, e.g. by how strongly its input channel is driven.
    """
    weight = torch.ones_like(groups) if importance is None else importance.expand_as(groups)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15.0).clamp(min=1e-8)
    best = (scale, low, torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15))
    best_err = (weight * (best[2] * scale[..., None] + low[..., None] - groups) ** 2).sum(-1)
    codes = best[2]
    n = weight.sum(-1)
    for _ in range(rounds):
        sc, sw = (weight * codes).sum(-1), (weight * groups).sum(-1)
        scc, scw = (weight * codes * codes).sum(-1), (weight * codes * groups).sum(-1)
        det = n * scc - sc * sc
        ok = det > 1e-12 * n * n
        fit_scale = torch.where(ok, (n * scw - sc * sw) / torch.where(ok, det, torch.ones_like(det)), best[0])
        fit_scale = fit_scale.clamp(min=1e-8)
        fit_low = torch.where(ok, (sw - fit_scale * sc) / n, best[1])
        codes = torch.round((groups - fit_low[..., None]) / fit_scale[..., None]).clamp(0, 15)
        err = (weight * (codes * fit_scale[..., None] + fit_low[..., None] - groups) ** 2).sum(-1)
        better = err < best_err
        best = (torch.where(better, fit_scale, best[0]), torch.where(better, fit_low, best[1]),
                torch.where(better[..., None], codes, best[2]))
        best_err = torch.minimum(err, best_err)
    return best[0], best[1], best[2].to(torch.uint8)


class Int4Linear(nn.Module):
    """Weight-only int4: asymmetric, a scale and a minimum per group of `group_size` input channels.

    Stored portably as two 4-bit codes per byte (`qweight`), with `scales` and `mins` [N, K/g];
    the weight is w = code * scale + min. On first use it is repacked once for the kernel that runs
    it (the compiled CPU one for decode rows, PyTorch's on CUDA); prefill rows go tile by tile. An input width that is not a multiple of the group size (SmolLM2's 576 with
    groups of 128) is padded with zero columns, and the input with zeros, which changes nothing.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int = 128,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}; got {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.padded = -(-in_features // group_size) * group_size
        groups = self.padded // group_size
        self.register_buffer("qweight", torch.zeros(out_features, self.padded // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype))
        self.register_buffer("mins", torch.zeros(out_features, groups, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self._packed: tuple[torch.Tensor, ...] | None = None  # the weight repacked for a kernel, built on first use

    @classmethod
    def from_float(cls, layer: nn.Linear, group_size: int = 128) -> Int4Linear:
        out = cls(layer.in_features, layer.out_features, layer.bias is not None, group_size, layer.weight.dtype)
        w = layer.weight.detach().float()
        w = torch.nn.functional.pad(w, (0, out.padded - out.in_features))
        groups = w.reshape(out.out_features, -1, group_size)
        scale, low, codes = fit_int4_groups(groups)
        codes = codes.reshape(out.out_features, out.padded)
        out.qweight = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
        out.scales, out.mins = scale.to(layer.weight.dtype), low.to(layer.weight.dtype)
        if layer.bias is not None:
            out.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        return out

    def codes(self) -> torch.Tensor:
        """The 4-bit codes [N, padded K] as int32."""
        low, high = self.qweight & 0x0F, self.qweight >> 4
        return torch.stack((low, high), dim=-1).reshape(self.out_features, self.padded).to(torch.int32)

    def dequantized(self) -> torch.Tensor:
        """The float weight [N, K] the codes stand for (for tests and export, not for inference)."""
        groups = self.codes().reshape(self.out_features, -1, self.group_size).float()
        w = groups * self.scales.float()[..., None] + self.mins.float()[..., None]
        return w.reshape(self.out_features, self.padded)[:, : self.in_features]

    def _rows(self, start: int, end: int) -> torch.Tensor:
        low, high = self.qweight[start:end] & 0x0F, self.qweight[start:end] >> 4
        codes = torch.stack((low, high), dim=-1).reshape(end - start, -1, self.group_size).float()
        w = codes * self.scales[start:end].float()[..., None] + self.mins[start:end].float()[..., None]
        return w.reshape(end - start, self.padded)

    def _cuda_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._packed is None or self._packed[1].dtype != dtype:
            codes = self.codes()
            packed = torch._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8), 8)
            # The kernel computes (code - 8) * scale + zero, so zero = min + 8 * scale.
            zero = self.mins.float() + 8 * self.scales.float()
            scales_zeros = torch.stack((self.scales.float(), zero), dim=-1).transpose(0, 1).contiguous().to(dtype)
            self._packed = (packed, scales_zeros)
        return self._packed

    def weights_changed(self) -> None:
        """Its codes, scales or minimums were written in place: the kernels' repacked copy is rebuilt on next use."""
        self._packed = None

    def cpu_packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The codes in the CPU kernel's nibble layout, and float32 scales and minimums (built once)."""
        if self._packed is None or self._packed[0].dtype != torch.uint8:
            self._packed = (cpu_kernels.pack_int4(self.codes()), self.scales.float(), self.mins.float())
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.padded != self.in_features:
            flat = torch.nn.functional.pad(flat, (0, self.padded - self.in_features))
        if x.device.type == "cuda":
            packed, scales_zeros = self._cuda_weights(x.dtype)
            y = torch._weight_int4pack_mm(flat.contiguous(), packed, self.group_size, scales_zeros)
        elif flat.shape[0] <= DECODE_ROWS and cpu_kernels.int4_chunk() is not None:
            # PyTorch's CPU int4 kernel has no fast path without AVX-512; ours streams the nibbles.
            packed, scales, mins = self.cpu_packed()
            y = torch.cat([cpu_kernels.int4_linear(rows, packed, scales, mins, self.group_size)
                           for rows in flat.split(cpu_kernels.SMALL_LINEAR_MAX_ROWS)]).to(x.dtype)
        else:
            y = _tiled(flat, self.out_features, self._rows)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


class GGUFLinear(nn.Module):
    """A linear layer whose weight stays in the GGUF blocks it shipped in (`blocks`, uint8 [N, bytes
    of a row], usually a view of the memory-mapped file), of ggml type `gguf_type`.

    On CPU every call runs on the blocks: decode rows and prefill rows alike are quantized to 8 bits
    per block and multiplied in integers (`cpu_kernels.gguf_linear`); float-typed blocks (F32, F16,
    BF16) with many rows go tile by tile through PyTorch's matrix product. No float copy of the whole
    weight is ever made. The kernels are CPU kernels: a model for CUDA is dequantized when loaded.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, gguf_type: int, row_bytes: int,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features, self.gguf_type = in_features, out_features, gguf_type
        self.register_buffer("blocks", torch.zeros(out_features, row_bytes, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.packed = False  # `blocks` in the decode layout of `cpu_kernels.gguf_pack` (see `pack`)

    @property
    def packable(self) -> bool:
        """Whether `pack` would repack these blocks (a k-quant type with a decode layout, whole groups of 16
        rows, and kernels in this build that read it)."""
        return not self.packed and cpu_kernels.gguf_packable(self.gguf_type, self.out_features)

    @property
    def packed_shape(self) -> tuple[int, int]:
        """The shape of the packed blocks: [groups of 16 rows, their bytes]."""
        return cpu_kernels.gguf_packed_shape(self.gguf_type, self.out_features, self.in_features)

    def pack(self) -> bool:
        """Repack Q4_K / Q6_K blocks into the decode layout (16 rows interleaved, scales unpacked: 2-11% more
        bytes than stored), once, after loading; the stored blocks' pages go back to the OS. False where the
        type or row count has no such layout."""
        if not self.packable:
            return False
        stored = self.blocks
        self.blocks = cpu_kernels.gguf_pack(stored.contiguous(), self.gguf_type, self.in_features)
        self.packed = True
        cpu_kernels.release_pages(stored)
        return True

    def use_packed(self, blocks: torch.Tensor) -> None:
        """Take blocks already in the decode layout (as `pack` made them before, kept on disk) in place of
        the stored ones, whose pages are then never read."""
        if not self.packable or tuple(blocks.shape) != self.packed_shape or blocks.dtype != torch.uint8:
            raise ValueError(f"packed blocks of shape {tuple(blocks.shape)} ({blocks.dtype}) do not fit a layer of "
                             f"{self.out_features} x {self.in_features} GGML type {self.gguf_type}; expected "
                             f"{self.packed_shape} uint8")
        self.blocks = blocks
        self.packed = True

    @property
    def float_blocks(self) -> bool:
        return self.gguf_type in GGUF_FLOAT_TYPES

    def dequantized(self) -> torch.Tensor:
        """The float32 weight [N, K] the blocks stand for (for tests and export, not for inference)."""
        return cpu_kernels.gguf_dequantize(self.blocks, self.gguf_type, self.in_features, self.packed)

    def _rows(self, start: int, end: int) -> torch.Tensor:
        return cpu_kernels.gguf_dequantize(self.blocks[start:end], self.gguf_type, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float().contiguous()
        if self.float_blocks and flat.shape[0] > DECODE_ROWS:
            y = _tiled(flat, self.out_features, self._rows)
            if self.bias is not None:
                y = y + self.bias.float()
        else:
            bias = None if self.bias is None else self.bias.float()
            y = cpu_kernels.gguf_linear(flat, self.blocks, self.gguf_type, bias, self.packed)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class GGUFEmbedding(nn.Module):
    """An embedding table kept in GGUF blocks: each call dequantizes only the rows it looks up."""

    def __init__(self, num_embeddings: int, embedding_dim: int, gguf_type: int, row_bytes: int,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.gguf_type, self.dtype = num_embeddings, embedding_dim, gguf_type, dtype
        self.register_buffer("blocks", torch.zeros(num_embeddings, row_bytes, dtype=torch.uint8))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).to(torch.int64).contiguous()
        rows = cpu_kernels.gguf_embedding(flat, self.blocks, self.gguf_type, self.embedding_dim)
        return rows.to(self.dtype).reshape(*ids.shape, self.embedding_dim)


GGUF_FLOAT_TYPES = (0, 1, 30)  # F32, F16, BF16
