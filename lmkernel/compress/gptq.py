"""GPTQ (Frantar et al., 2022): round a linear layer's weights to int4 one input column at a time,
pushing each column's rounding error onto the columns not yet rounded, weighted by the inverse of
the calibration inputs' second moment H = X^T X / n. The layer's output on inputs like the
calibration text changes far less than with plain rounding to nearest.

The result is an ordinary `Int4Linear` (same groups, codes, scales and minimums), so it saves,
loads and runs like any other int4 layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lmkernel.compress.quantize import DEFAULT_SKIP, QuantizationConfig, check_request, round_embeddings, skipped
from lmkernel.errors import LmkError
from lmkernel.layers.attention import AttentionMetadata
from lmkernel.layers.linear import Int4Linear, fit_int4_groups
from lmkernel.loading import LoadedModel

BLOCK = 128  # columns updated lazily together (the paper's batching; the result does not depend on it)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, with `damp` times H's mean diagonal added for stability."""
    h = h.clone()
    h.diagonal().add_(damp * float(h.diagonal().mean()) + 1e-8)
    for attempt in range(5):
        try:
            lower = torch.linalg.cholesky(h)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:  # not positive definite in float precision: damp harder
            h.diagonal().add_(float(h.diagonal().mean()) * 10.0 ** (attempt - 2))
    raise LmkError("GPTQ: the calibration inputs' second-moment matrix stays singular even damped; "
                   "use more (or more varied) calibration text")


@torch.no_grad()
def gptq_weight(w: torch.Tensor, gram: torch.Tensor, group_size: int = 128,
                damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes [N, K] (uint8), scales and minimums [N, K/g] for a weight [N, K] (K a multiple of g).

    Columns are rounded from the most to the least driven input (largest H diagonal first), so the
    important ones go while the most freedom is left to absorb their error ("act order"). Each
    group's grid is fitted up front to the original weights, weighting every column's error by how
    strongly its input is driven (H's diagonal), so groups stay contiguous in the stored layout.
    Rows are independent given H, so layers that read the same input can be stacked into one call.
    """
    n, k = w.shape
    w, h = w.float().clone(), gram.float().clone()
    dead = h.diagonal() == 0  # inputs that are always zero (and padding): their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    scales, mins, _ = fit_int4_groups(w.reshape(n, -1, group_size), importance=h.diagonal().reshape(1, -1, group_size))

    order = torch.argsort(h.diagonal(), descending=True)
    hinv = _inverse_cholesky(h[order][:, order], damp)
    # Transposed, so that each input column is one contiguous row of `wt`.
    wt = w[:, order].T.contiguous()
    row_scale = scales.T.repeat_interleave(group_size, dim=0)[order].contiguous()
    row_min = mins.T.repeat_interleave(group_size, dim=0)[order].contiguous()
    codes = torch.empty(k, n)
    for b0 in range(0, k, BLOCK):
        b1 = min(b0 + BLOCK, k)
        block, errors, hb = wt[b0:b1].clone(), torch.empty(b1 - b0, n), hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            scale, low = row_scale[b0 + i], row_min[b0 + i]
            q = torch.round((block[i] - low) / scale).clamp_(0, 15)
            codes[b0 + i] = q
            err = (block[i] - (q * scale + low)) / hb[i, i]
            block[i:].addr_(hb[i, i:], err, alpha=-1.0)
            errors[i] = err
        wt[b1:] -= hinv[b0:b1, b1:].T @ errors
    stored = torch.empty_like(codes)
    stored[order] = codes
    stored = stored.T.contiguous()
    return stored.to(torch.uint8), scales, mins


def _int4_layer(layer: nn.Linear, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                group_size: int) -> Int4Linear:
    out = Int4Linear(layer.in_features, layer.out_features, layer.bias is not None, group_size, layer.weight.dtype)
    device, dtype = layer.weight.device, layer.weight.dtype
    out.qweight = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous().to(device)
    out.scales, out.mins = scales.to(dtype).to(device), mins.to(dtype).to(device)
    if layer.bias is not None:
        out.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    return out


def _padded_weight(layer: nn.Linear, group_size: int) -> torch.Tensor:
    """The weight in float32 with zero columns added up to a multiple of the group size."""
    k = -(-layer.in_features // group_size) * group_size
    return torch.nn.functional.pad(layer.weight.detach().float().cpu(), (0, k - layer.in_features))


def second_moment(x: torch.Tensor, block: int = 256) -> torch.Tensor:
    """x^T x for x [tokens, K], computing only the blocks on and above the diagonal (H is symmetric):
    about 60% of the multiply-adds of one full product."""
    k = x.shape[1]
    h = torch.empty(k, k, dtype=x.dtype, device=x.device)
    for i in range(0, k, block):
        top = x[:, i : i + block].T @ x[:, i:]
        h[i : i + block, i:] = top
        h[i + block :, i : i + block] = top[:, block:].T
    return h


def _padded_gram(gram: torch.Tensor, group_size: int) -> torch.Tensor:
    """H with zero rows and columns added up to a multiple of the group size."""
    n = gram.shape[0]
    k = -(-n // group_size) * group_size
    h = torch.zeros(k, k)
    h[:n, :n] = gram.float().cpu()
    return h


def gptq_int4(layer: nn.Linear, gram: torch.Tensor, group_size: int = 128, damp: float = 0.01) -> Int4Linear:
    """An int4 copy of `layer` whose rounding minimises the output error on inputs with second moment `gram`."""
    codes, scales, mins = gptq_weight(_padded_weight(layer, group_size), _padded_gram(gram, group_size), group_size, damp)
    return _int4_layer(layer, codes, scales, mins, group_size)


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of transformer layers (the largest ModuleList)."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise LmkError("this model has no stack of layers to quantize one by one")
    return max(lists, key=lambda item: len(item[1]))


def _shared_inputs(layer: nn.Module, names: Sequence[str], args: tuple[object, ...],
                   kwargs: dict[str, object]) -> list[list[str]]:
    """The linear layers of `layer` grouped by the tensor they read (Q, K, V; gate, up), in call order,
    found by running it once on the given inputs."""
    groups: list[list[str]] = []
    last: list[torch.Tensor | None] = [None]

    def note(_: nn.Module, inputs: tuple[torch.Tensor, ...], name: str) -> None:
        if inputs[0] is last[0]:
            groups[-1].append(name)
        else:
            last[0] = inputs[0]
            groups.append([name])

    hooks = [layer.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: note(m, a, n)) for n in names]
    try:
        layer(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return groups


class _Stop(Exception):
    """Ends a forward pass once the first transformer layer's inputs are captured."""


def _first_layer_inputs(lm: LoadedModel, first: nn.Module,
                        seqs: Sequence[list[int]]) -> tuple[tuple[object, ...], dict[str, object]]:
    """What the model hands its first transformer layer (`first`) for these sequences, laid end to end."""
    captured: list[tuple[tuple[object, ...], dict[str, object]]] = []

    def capture(_: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        """Keep the layer's inputs and stop the forward pass there."""
        captured.append((args, kwargs))
        raise _Stop

    meta = AttentionMetadata.for_lengths([len(s) for s in seqs], causal=not lm.config.is_encoder)
    ids = torch.tensor([t for s in seqs for t in s], device=lm.device)
    positions = torch.tensor([p for s in seqs for p in range(len(s))], device=lm.device)
    hook = first.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        lm.model(ids, positions, meta)
    except _Stop:
        pass
    finally:
        hook.remove()
    return captured[0]


def _quantize_group(layer: nn.Module, members: list[str], x: torch.Tensor, group_size: int,
                    damp: float) -> list[tuple[str, Int4Linear]]:
    """The int4 layers of `layer`'s linears `members`, which all read `x`: rounded by GPTQ in one stacked call, each
    float weight set to its quantized values for the rest of the pass."""
    x = x.reshape(-1, x.shape[-1]).float()
    modules = [layer.get_submodule(m) for m in members]
    weights = torch.cat([_padded_weight(m, group_size) for m in modules])
    codes, scales, mins = gptq_weight(weights, _padded_gram(second_moment(x) / x.shape[0], group_size), group_size, damp)
    swaps: list[tuple[str, Int4Linear]] = []
    row = 0
    for name, module in zip(members, modules):
        rows = slice(row, row + module.out_features)
        row += module.out_features
        new = _int4_layer(module, codes[rows], scales[rows], mins[rows], group_size)
        # The rest of this pass reads the float layer holding the quantized values (a dense
        # product is faster on many rows than int4 tiles); the int4 layer replaces it after.
        module.weight.copy_(new.dequantized().to(module.weight.dtype))
        swaps.append((name, new))
    return swaps


def _quantize_layer(layer: nn.Module, prefix: str, inputs: tuple[tuple[object, ...], dict[str, object]],
                    probe: tuple[tuple[object, ...], dict[str, object]], skip: Sequence[str], group_size: int,
                    damp: float) -> tuple[object, list[str]]:
    """Run one transformer layer on `inputs` (args, kwargs), rounding each group of its linears outside `skip` when
    the pass reaches it, then putting the int4 layers in place; returns its output and the names it quantized."""
    names = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear) and not skipped(prefix + n, skip)]
    groups = _shared_inputs(layer, names, *probe)
    swaps: list[tuple[str, Int4Linear]] = []

    def quantize(_: nn.Module, args: tuple[torch.Tensor, ...], members: list[str]) -> None:
        """Round the group `members` on the input the pass has just brought them."""
        swaps.extend(_quantize_group(layer, members, args[0], group_size, damp))

    hooks = [layer.get_submodule(g[0]).register_forward_pre_hook(lambda m, a, g=g: quantize(m, a, g)) for g in groups]
    try:
        hidden = layer(*inputs[0], **inputs[1])
    finally:
        for h in hooks:
            h.remove()
    for name, new in swaps:
        parent, _, child = name.rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, child, new)
    return hidden, [prefix + name for name, _ in swaps]


@torch.no_grad()
def gptq_quantize(lm: LoadedModel, sequences: Sequence[list[int]], group_size: int = 128,
                  skip: Sequence[str] = DEFAULT_SKIP, damp: float = 0.01) -> QuantizationConfig:
    """Quantize every linear layer outside `skip` to int4 with GPTQ, in place; returns what was done.

    All calibration sequences go through the model together, one transformer layer at a time. Inside
    a layer, each group of linears is rounded when the forward pass reaches it, on inputs that come
    through everything before it already quantized, so every later layer corrects for the earlier
    ones' error (the paper's sequential mode, within layers too), and each layer runs only once.
    """
    check_request(lm.model, "int4", group_size)
    if not sequences:
        raise LmkError("GPTQ needs calibration text; the calibration set is empty")
    round_embeddings(lm.model)
    stack_name, stack = _decoder_layers(lm.model)
    # All sequences in one call: a group is rounded only once every calibration input has reached it.
    (hidden, *rest), kwargs = _first_layer_inputs(lm, stack[0], sequences)
    probe = _first_layer_inputs(lm, stack[0], sequences[:1])
    done: list[str] = []
    for index, layer in enumerate(stack):
        hidden, names = _quantize_layer(layer, f"{stack_name}.{index}.", ((hidden, *rest), kwargs), probe, skip,
                                        group_size, damp)
        done += names
    if not done:
        raise LmkError("no linear layer left to quantize after the skip list")
    return QuantizationConfig("int4", group_size, tuple(skip), done, rounding="gptq")
