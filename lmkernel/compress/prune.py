"""Pruning: remove what a model needs least, ranked on calibration text.

Unstructured: zero the least important weights of every linear layer but the heads. Magnitude ranks
weights by |W|; Wanda by |W| times the L2 norm of its input channel over calibration text (Sun et
al., 2023), compared within each output row, so every row ends at the target sparsity.

Structured (Llama family): drop whole FFN channels, query heads and decoder layers, so the result
is a smaller dense model with a plain Hugging Face config. A channel or head scores the L2 norm of
its activation over the calibration text times the norm of the output-projection weights it feeds;
a layer scores how far it moves the hidden state (1 - cosine of its output to its input). Every
layer keeps the same number of channels and heads, as the config has one size for all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from lmkernel.compress.calibrate import input_norms, layer_cosines
from lmkernel.compress.quantize import DEFAULT_SKIP, is_quantized, skipped
from lmkernel.errors import LmkError
from lmkernel.loading import LoadedModel
from lmkernel.models import model_class
from lmkernel.models.weights import build_on_meta

METHODS = ("magnitude", "wanda")


@dataclass(frozen=True)
class PruneReport:
    method: str
    sparsity: float
    layers: list[str]
    zeros: int
    weights: int


def prunable_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not skipped(n, DEFAULT_SKIP)]


@torch.no_grad()
def prune_unstructured(lm: LoadedModel, method: str, sparsity: float,
                       calibration: list[list[int]] | None = None) -> PruneReport:
    """Zero `sparsity` of each row of every prunable linear layer, in place."""
    if method not in METHODS:
        raise LmkError(f"--method must be one of {', '.join(METHODS)} (or structured); got '{method}'")
    if not 0.0 <= sparsity < 1.0:
        raise LmkError(f"--sparsity must be in [0, 1); got {sparsity}")
    if is_quantized(lm.model):
        raise LmkError("this model is quantized; prune the float model, then quantize")
    layers = prunable_layers(lm.model)
    norms: dict[str, torch.Tensor] = {}
    if method == "wanda":
        if not calibration:
            raise LmkError("wanda needs calibration text; the calibration set is empty")
        norms = input_norms(lm, layers, calibration)
    zeros = total = 0
    for name in layers:
        w = lm.model.get_submodule(name).weight
        score = w.abs().float()
        if method == "wanda":
            score = score * norms[name].to(score.device)[None, :]
        k = int(w.shape[1] * sparsity)
        if k > 0:
            drop = torch.topk(score, k, dim=1, largest=False).indices
            w.scatter_(1, drop, 0.0)
        zeros += int((w == 0).sum())
        total += w.numel()
    return PruneReport(method, sparsity, layers, zeros, total)


@dataclass(frozen=True)
class StructuredReport:
    ffn_channels: tuple[int, int]  # (before, after) per layer
    heads: tuple[int, int]  # query heads (before, after); key/value heads are all kept
    layers_removed: list[int]  # indices in the original model
    parameters: tuple[int, int]  # (before, after)


FFN_MULTIPLE = 16  # kept FFN widths are rounded to this: matrix products run ~10% faster than on odd sizes


def _keep_count(total: int, fraction: float, what: str, multiple: int = 1) -> int:
    """How many of `total` to keep when removing `fraction` of them, rounded to a multiple of
    `multiple` where `total` is one."""
    if not 0.0 <= fraction < 1.0:
        raise LmkError(f"--{what} must be in [0, 1); got {fraction}")
    keep = total - round(total * fraction)
    if fraction > 0 and multiple > 1 and total % multiple == 0:
        keep = min(total, max(multiple, round(keep / multiple) * multiple))
    return keep


@torch.no_grad()
def prune_structured(lm: LoadedModel, calibration: list[list[int]], ffn: float = 0.0, heads: float = 0.0,
                     layers: int = 0) -> tuple[LoadedModel, StructuredReport]:
    """A smaller dense copy of a Llama-family model without its least important FFN channels,
    query heads (the same number from every key/value group) and `layers` decoder layers."""
    c = lm.config
    if c.architecture != "llama":
        raise LmkError(f"structured pruning supports the Llama family; this model is {c.architecture}")
    if is_quantized(lm.model):
        raise LmkError("this model is quantized; prune the float model, then quantize")
    if not 0 <= layers < c.num_layers:
        raise LmkError(f"--layers must be in [0, {c.num_layers - 1}] for this {c.num_layers}-layer model; got {layers}")
    keep_ffn = _keep_count(c.intermediate_size, ffn, "ffn", FFN_MULTIPLE)
    group = c.num_heads // c.num_kv_heads
    keep_per_group = _keep_count(group, heads, "heads")
    if keep_per_group < 1:
        raise LmkError(f"--heads {heads} would remove every query head of a key/value group of {group}")
    if not calibration:
        raise LmkError("structured pruning needs calibration text; the calibration set is empty")

    stack = lm.model.model.layers
    names = [f"model.layers.{i}.{part}" for i in range(c.num_layers) for part in ("mlp.down_proj", "self_attn.o_proj")]
    norms = input_norms(lm, names, calibration)
    drop_layers = sorted(torch.argsort(layer_cosines(lm, stack, calibration), descending=True)[:layers].tolist())

    tensors = dict(lm.model.state_dict())
    kept_layers = [i for i in range(c.num_layers) if i not in drop_layers]
    out: dict[str, torch.Tensor] = {k: v for k, v in tensors.items() if not k.startswith("model.layers.")}
    for new_index, old in enumerate(kept_layers):
        prefix = f"model.layers.{old}."
        layer = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        down = layer["mlp.down_proj.weight"]
        score = norms[f"{prefix}mlp.down_proj"].to(down.device) * down.float().norm(dim=0)
        channels = torch.sort(torch.topk(score, keep_ffn).indices).values
        for proj in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            layer[proj] = layer[proj][channels]
        layer["mlp.down_proj.weight"] = down[:, channels]

        o = layer["self_attn.o_proj.weight"]
        per_channel = norms[f"{prefix}self_attn.o_proj"].to(o.device) * o.float().norm(dim=0)
        head_score = per_channel.view(c.num_kv_heads, group, c.head_dim).sum(-1)
        kept_heads = torch.sort(torch.topk(head_score, keep_per_group, dim=1).indices, dim=1).values
        kept_heads = (kept_heads + torch.arange(c.num_kv_heads, device=o.device)[:, None] * group).flatten()
        rows = (kept_heads[:, None] * c.head_dim + torch.arange(c.head_dim, device=o.device)).flatten()
        layer["self_attn.q_proj.weight"] = layer["self_attn.q_proj.weight"][rows]
        if "self_attn.q_proj.bias" in layer:
            layer["self_attn.q_proj.bias"] = layer["self_attn.q_proj.bias"][rows]
        layer["self_attn.o_proj.weight"] = o[:, rows]
        out.update({f"model.layers.{new_index}.{k}": v.contiguous() for k, v in layer.items()})

    config = dataclasses.replace(c, intermediate_size=keep_ffn, num_heads=keep_per_group * c.num_kv_heads,
                                 num_layers=len(kept_layers))
    model = build_on_meta(model_class(config), config)
    model.load_weights(out, f"{lm.source.path} (pruned)")
    pruned = dataclasses.replace(lm, config=config, model=model.eval())
    report = StructuredReport((c.intermediate_size, keep_ffn), (c.num_heads, config.num_heads), drop_layers,
                              (lm.num_parameters, pruned.num_parameters))
    return pruned, report
