"""The recommender's item encoder: a sentence encoder fine-tuned so that items one user chose close in time
land close together. Pairs (an item, one of the next `window` items in the same user's history) are the
positives; the other items of the batch are the negatives (a symmetric InfoNCE loss with a temperature), so
the vectors learn behaviour while the text keeps new, never-seen items in the same space.

Only the top `trainable_layers` layers of the encoder (BERT, MPNet, nomic-bert, EmbeddingGemma) are trained.
The catalogue is a fixed set of short texts, so what the frozen layers make of each item is computed once and
reused at every step: a step costs the top layers' forward and backward passes alone, several times less than
the whole encoder's."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lmkernel.errors import LmkError
from lmkernel.layers.attention import AttentionMetadata
from lmkernel.loading import LoadedModel
from lmkernel.models.encoder_stack import run_stack
from lmkernel.train.optim import build_optimizer, build_schedule


@dataclass(frozen=True)
class EncoderTraining:
    steps: int = 300
    batch_size: int = 64
    lr: float = 2e-4
    window: int = 3  # a positive is one of the next `window` items of the same user
    temperature: float = 0.05
    max_tokens: int = 48
    trainable_layers: int = 2
    seed: int = 0


def behaviour_pairs(sequences: Sequence[np.ndarray], window: int) -> np.ndarray:
    """[P, 2] item pairs (a, b) with b among the `window` items after a in one user's time-ordered items."""
    pairs = [np.stack([seq[:-k], seq[k:]], axis=1) for seq in sequences for k in range(1, window + 1) if len(seq) > k]
    return np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)


def _layout(lengths: Sequence[int], device: torch.device) -> tuple[torch.Tensor, AttentionMetadata]:
    positions = torch.tensor([p for n in lengths for p in range(n)], device=device)
    return positions, AttentionMetadata.for_lengths(list(lengths), causal=False)


def _frozen_states(model: torch.nn.Module, tokens: Sequence[Sequence[int]], frozen: int,
                   device: torch.device) -> list[torch.Tensor]:
    """Each item's hidden states after the embeddings and the first `frozen` layers, [len, hidden] apiece."""
    out: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in range(0, len(tokens), 256):
            chunk = tokens[start : start + 256]
            positions, meta = _layout([len(t) for t in chunk], device)
            ids = torch.tensor([t for seq in chunk for t in seq], device=device)
            h = run_stack(model, model.embed_tokens(ids, positions), positions, meta, 0, frozen)
            out.extend(x.clone() for x in torch.split(h, [len(t) for t in chunk]))
    return out


def _encode_top(model: torch.nn.Module, states: Sequence[torch.Tensor], frozen: int) -> torch.Tensor:
    positions, meta = _layout([len(s) for s in states], states[0].device)
    h = model.finish(run_stack(model, torch.cat(list(states)), positions, meta, frozen))
    return F.normalize(model.pool(h, meta), dim=-1)


def item_prompt(loaded: LoadedModel) -> str | None:
    """The prompt an encoder wants before a document (nomic's `search_document: `), if it has one: items are
    what the recommender retrieves."""
    return "document" if "document" in loaded.config.prompts else None


def fine_tune(loaded: LoadedModel, texts: Sequence[str], pairs: np.ndarray, cfg: EncoderTraining,
              on_step=None) -> list[float]:
    """Train the top layers of `loaded.model` in place on the behaviour pairs; returns the loss of each step."""
    if len(pairs) == 0 or cfg.steps == 0:
        return []
    model, device = loaded.model, loaded.device
    if not loaded.config.is_encoder or not hasattr(model, "stack"):
        raise LmkError(f"{loaded.source.path}: the recommender fine-tunes sentence encoders (all-minilm-l6-v2, "
                       f"all-mpnet-base-v2, nomic-embed-text-v1.5, embeddinggemma-300m); a "
                       f"{loaded.config.architecture} model is not one")
    frozen = max(0, len(model.stack) - cfg.trainable_layers)
    prompt = loaded.config.prompts.get(item_prompt(loaded) or "", "")
    tokens = [ids[: cfg.max_tokens - 1] + ids[-1:] if len(ids) > cfg.max_tokens else ids
              for ids in loaded.tokenizer.encode_batch([prompt + t for t in texts])]
    states = _frozen_states(model, tokens, frozen, device)
    top = torch.nn.ModuleList(model.stack[frozen:])
    for param in model.parameters():
        param.requires_grad_(False)
    for param in top.parameters():
        param.requires_grad_(True)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)  # nosec B311  # seeded order for data and benchmarks, not a secret
    optimizer = build_optimizer("adamw", top, cfg.lr, 0.01)
    schedule = build_schedule(optimizer, "linear", max(1, cfg.steps // 10), cfg.steps)
    model.train()
    losses = []
    eye = torch.eye(cfg.batch_size, dtype=torch.bool, device=device)
    target = torch.arange(cfg.batch_size, device=device)
    for step in range(cfg.steps):
        chosen = pairs[[rng.randrange(len(pairs)) for _ in range(cfg.batch_size)]]
        a, b = chosen[:, 0], chosen[:, 1]
        va = _encode_top(model, [states[i] for i in a], frozen)
        vb = _encode_top(model, [states[i] for i in b], frozen)
        logits = va @ vb.T / cfg.temperature
        # Another row whose item is this row's positive (or anchor) is not a negative.
        same_b = torch.as_tensor(b[None, :] == b[:, None], device=device) & ~eye
        same_a = torch.as_tensor(a[None, :] == a[:, None], device=device) & ~eye
        loss = 0.5 * (F.cross_entropy(logits.masked_fill(same_b, -math.inf), target)
                      + F.cross_entropy(logits.T.masked_fill(same_a, -math.inf), target))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(top.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, losses[-1])
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return losses


def item_vectors(loaded: LoadedModel, texts: Sequence[str]) -> np.ndarray:
    """Normalised item vectors [N, dim], float32."""
    with torch.inference_mode():
        vectors = loaded.embed(list(texts), prompt_name=item_prompt(loaded))
    return F.normalize(vectors, dim=-1).numpy().astype(np.float32)
