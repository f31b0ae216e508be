"""Sentence-embedding throughput against the peer users run the same model with, in one process, rounds
alternating: sentence-transformers for a sentence-transformers folder (its `encode`, which sorts by length and
batches by 32), llama.cpp's embeddings for a GGUF file (512-token batches, same threads).
Both sides embed the same texts; the cosine between their embeddings is printed beside the speeds."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmkernel.errors import LmkError
from lmkernel.loading import LoadedModel


@dataclass(frozen=True)
class EmbedSpeed:
    peer: str
    sentences: int
    tokens: int
    ours: float  # sentences a second, median over rounds
    theirs: float
    min_cosine: float


def _timed(run: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = run()
    return time.perf_counter() - start, out


def peer_embedder(loaded: LoadedModel, threads: int, batch_size: int) -> tuple[str, Callable[[list[str]], torch.Tensor]]:
    """The peer's name and a function embedding texts with it (normalised, as ours are)."""
    path = loaded.source.path
    if loaded.source.kind == "gguf":
        from llama_cpp import Llama

        # 512-token batches: the fastest of 512, 2,048 and 8,192 here (its mask grows with the batch)
        llm = Llama(model_path=str(path), embedding=True, n_ctx=512, n_batch=512, n_ubatch=512, n_threads=threads,
                    n_threads_batch=threads, verbose=False, pooling_type=1 if loaded.config.pooling == "mean" else 2)
        return "llama.cpp", lambda texts: F.normalize(torch.tensor(llm.embed(texts, normalize=False)), dim=-1)
    if not (path / "modules.json").is_file():
        raise LmkError(f"{path}: the embedding benchmark compares with sentence-transformers (a folder with "
                       "modules.json) or llama.cpp (a GGUF file)")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device="cpu")
    return "sentence-transformers", lambda texts: F.normalize(
        model.encode(texts, batch_size=batch_size, convert_to_tensor=True), dim=-1)


def embed_speed(loaded: LoadedModel, texts: list[str], rounds: int, threads: int, batch_size: int = 32) -> EmbedSpeed:
    """Sentences a second for lmkernel (`LoadedModel.embed`) and the peer, rounds alternating."""
    torch.set_num_threads(threads)
    name, theirs = peer_embedder(loaded, threads, batch_size)
    ours_times, their_times = [], []
    ours_out = their_out = None
    for _ in range(rounds):
        elapsed, ours_out = _timed(lambda: loaded.embed(texts))
        ours_times.append(elapsed)
        elapsed, their_out = _timed(lambda: theirs(texts))
        their_times.append(elapsed)
    cosine = F.cosine_similarity(ours_out.double(), their_out.double(), dim=-1).min().item()
    tokens = sum(len(ids) for ids in loaded.tokenizer.encode_batch(texts))
    return EmbedSpeed(name, len(texts), tokens, len(texts) / statistics.median(ours_times),
                      len(texts) / statistics.median(their_times), cosine)
