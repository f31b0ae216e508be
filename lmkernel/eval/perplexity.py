"""Sliding-window perplexity of a causal LM over a text, the way Hugging Face's guide computes it:
windows of `window` tokens moved by `stride`, each scoring only the tokens no earlier window scored,
so every token but the first is predicted from up to `window - stride` tokens of context."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lmkernel.errors import LmkError
from lmkernel.layers.attention import AttentionMetadata
from lmkernel.loading import LoadedModel


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    tokens: int  # tokens scored
    nll: float  # mean negative log-likelihood, nats


def read_text(path: Path, flag: str = "--data") -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LmkError(f"{flag} {path}: cannot read it as UTF-8 text ({exc})") from None
    if not text.strip():
        raise LmkError(f"{flag} {path}: the file is empty")
    return text


@torch.inference_mode()
def _token_nll(lm: LoadedModel, ids: list[int], score_from: int, chunk: int = 512) -> torch.Tensor:
    """Negative log-likelihoods of ids[score_from:], each predicted from the ids before it."""
    meta = AttentionMetadata.for_lengths([len(ids)], causal=True)
    x = torch.tensor(ids, device=lm.device)
    hidden = lm.model(x, torch.arange(len(ids), device=lm.device), meta)
    out = []
    for start in range(max(score_from, 1) - 1, len(ids) - 1, chunk):
        end = min(start + chunk, len(ids) - 1)
        logp = torch.log_softmax(lm.model.compute_logits(hidden[start:end]).float(), dim=-1)
        out.append(-logp.gather(1, x[start + 1 : end + 1, None]).squeeze(1))
    return torch.cat(out).cpu()


def perplexity(lm: LoadedModel, text: str, max_tokens: int | None = None, window: int | None = None) -> PerplexityResult:
    """Perplexity of `text` (its first `max_tokens` tokens) under a decoder model."""
    if lm.config.is_encoder:
        raise LmkError(f"{lm.source.path}: perplexity needs a causal LM; this is an encoder")
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise LmkError("the text has fewer than 2 tokens; nothing to score")
    window = window or lm.config.max_position_embeddings
    if window < 2:
        raise LmkError(f"--window must be at least 2; got {window}")
    stride = max(window // 2, 1)
    nll = []
    scored = 1  # tokens before this one are scored (the first has no prediction)
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        nll.append(_token_nll(lm, ids[begin:end], scored - begin))
        scored = end
        if end == len(ids):
            break
    values = torch.cat(nll)
    mean = float(values.mean())
    return PerplexityResult(math.exp(mean), int(values.numel()), mean)
