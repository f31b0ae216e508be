"""Calibration sequences (windows of a text, or text the model generates itself) and the statistics
taken on them: what the inputs of each linear layer look like."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lmkernel.errors import LmkError
from lmkernel.layers.attention import AttentionMetadata, DecodeGroup, GroupedDecode, KVLayer, PagedLayout
from lmkernel.loading import LoadedModel


def calibration_sequences(lm: LoadedModel, text: str, count: int = 128, length: int = 128,
                          start: int = 0) -> list[list[int]]:
    """`count` consecutive windows of `length` tokens from token `start` of `text` on."""
    ids = lm.tokenizer.encode(text, add_special_tokens=False)[start:]
    if len(ids) < 2:
        raise LmkError("the calibration text is empty (fewer than 2 tokens)")
    seqs = [ids[i : i + length] for i in range(0, min(len(ids), count * length), length)]
    return [s for s in seqs if len(s) >= 2]


def _sample(probs: torch.Tensor, generator: torch.Generator, last: int) -> torch.Tensor:
    """One token id per row of `probs` [B, V], drawn by inverse CDF: one uniform number a row (torch.multinomial
    draws one per vocabulary entry, which costs more than the model's forward here). A token of probability
    0 is never drawn; `last` (the highest id allowed) catches a draw that rounding puts past the end."""
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=last)


@torch.inference_mode()
def generated_sequences(lm: LoadedModel, count: int = 128, length: int = 128, seed: int = 0) -> list[list[int]]:
    """`count` sequences of `length` tokens sampled from the model itself (data-free calibration, as in
    LLM-QAT, Liu et al. 2023), so calibrating needs no text file.

    Each sequence starts from the BOS token when the model has one, else from a token drawn at random;
    then temperature-1 sampling from the full distribution, with a `torch.Generator` seeded by `seed`
    (the same model and seed give the same sequences). Special tokens (end of sequence included) are
    never sampled, so every sequence is `length` tokens of text. All sequences advance together, one
    token a step, each step one forward over the new tokens that reads the earlier ones from a K/V
    cache laid out here (sequence i owns cache rows i * length ... (i + 1) * length - 1).
    """
    config = lm.config
    if config.is_encoder:
        raise LmkError(f"{lm.source.path}: an encoder cannot generate its calibration text; give a text file to calibrate on")
    if count < 1 or not 2 <= length <= config.max_context:
        raise LmkError(f"generated calibration needs count >= 1 and 2 <= length <= {config.max_context}; "
                       f"got count={count}, length={length}")
    generator = torch.Generator().manual_seed(seed)
    vocab = min(config.vocab_size, lm.tokenizer.vocab_size)
    banned = torch.zeros(config.vocab_size, dtype=torch.bool)
    banned[vocab:] = True  # rows of the head past the tokenizer's vocabulary (padding) name no token
    specials = {*lm.tokenizer.all_special_ids, *config.eos_token_ids, lm.tokenizer.eos_token_id}
    banned[[i for i in specials if i is not None and 0 <= i < config.vocab_size]] = True
    last_allowed = int((~banned).nonzero().max())
    bos = lm.tokenizer.bos_token_id if lm.tokenizer.bos_token_id is not None else config.bos_token_id
    if bos is not None:
        first = torch.full((count,), bos, dtype=torch.long)
    else:
        allowed = (~banned).nonzero().squeeze(1)
        first = allowed[torch.randint(len(allowed), (count,), generator=generator)]
    tokens = torch.empty(count, length, dtype=torch.long)
    tokens[:, 0] = first
    device = lm.device
    shape = (count * length, config.num_kv_heads, config.head_dim)
    caches = [KVLayer(torch.zeros(shape, dtype=lm.dtype, device=device), torch.zeros(shape, dtype=lm.dtype, device=device))
              for _ in range(config.num_layers)]
    starts = torch.arange(count, device=device) * length
    rows = torch.arange(count, device=device)
    for t in range(length - 1):
        # Every sequence adds its token at position t and attends to its rows 0..t: one group, no padding.
        slots = starts[:, None] + torch.arange(t + 1, device=device)[None, :]
        scratch = (count * (t + 1), *shape[1:])  # what each layer gathers the contexts into
        group = DecodeGroup(seqs=tuple(range(count)), rows=rows, slots=slots, mask=None,
                            keys=torch.empty(scratch, dtype=lm.dtype, device=device),
                            values=torch.empty(scratch, dtype=lm.dtype, device=device))
        paged = PagedLayout(slot_mapping=starts + t, seq_lens=(t + 1,) * count, context_slots={}, decode=GroupedDecode((group,)))
        meta = AttentionMetadata.for_lengths([1] * count, causal=True, paged=paged)
        hidden = lm.model(tokens[:, t].to(device), torch.full((count,), t, device=device), meta, caches)
        logits = lm.model.compute_logits(hidden).float().cpu()
        logits[:, banned] = float("-inf")
        tokens[:, t + 1] = _sample(torch.softmax(logits, dim=-1), generator, last_allowed)
    return tokens.tolist()


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
