"""Calibration statistics: what the inputs of each linear layer look like on real text."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lmkernel.errors import LmkError
from lmkernel.layers.attention import AttentionMetadata
from lmkernel.loading import LoadedModel


def calibration_sequences(lm: LoadedModel, text: str, count: int = 128, length: int = 128,
                          start: int = 0) -> list[list[int]]:
    """`count` consecutive windows of `length` tokens from token `start` of `text` on."""
    ids = lm.tokenizer.encode(text, add_special_tokens=False)[start:]
    if len(ids) < 2:
        raise LmkError("the calibration text is empty (fewer than 2 tokens)")
    seqs = [ids[i : i + length] for i in range(0, min(len(ids), count * length), length)]
    return [s for s in seqs if len(s) >= 2]


def _run(lm: LoadedModel, sequences: Sequence[list[int]], hooks: list[RemovableHandle]) -> None:
    """Each calibration sequence through the model on its own, then the `hooks` that collected what
    they needed are removed (also when a sequence fails)."""
    try:
        for seq in sequences:
            meta = AttentionMetadata.for_lengths([len(seq)], causal=not lm.config.is_encoder)
            lm.model(torch.tensor(seq, device=lm.device), torch.arange(len(seq), device=lm.device), meta)
    finally:
        for h in hooks:
            h.remove()


@torch.inference_mode()
def input_norms(lm: LoadedModel, layers: Sequence[str], sequences: Sequence[list[int]]) -> dict[str, torch.Tensor]:
    """Per linear layer, the L2 norm over all calibration tokens of each input channel [in_features]."""
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name in layers:
        module = lm.model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise LmkError(f"'{name}' is not a linear layer")

        def hook(_: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)

        hooks.append(module.register_forward_pre_hook(hook))
    _run(lm, sequences, hooks)
    return {name: s.sqrt().cpu() for name, s in sums.items()}


@torch.inference_mode()
def layer_cosines(lm: LoadedModel, stack: nn.ModuleList, sequences: Sequence[list[int]]) -> torch.Tensor:
    """Per layer of `stack`, the mean cosine similarity between its input and output hidden states.

    A layer whose output is nearly its input changes little and is the first to remove
    ("block influence", Men et al., 2024).
    """
    sums = torch.zeros(len(stack))
    hooks = []
    for index, layer in enumerate(stack):
        def hook(_: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor, index: int = index) -> None:
            out = output[0] if isinstance(output, tuple) else output
            sums[index] += torch.nn.functional.cosine_similarity(args[0].float(), out.float(), dim=-1).sum().cpu()

        hooks.append(layer.register_forward_hook(hook))
    _run(lm, sequences, hooks)
    return sums / max(sum(len(s) for s in sequences), 1)
