"""`LLM`: the offline API. Generate, chat, embed and classify over lists of inputs, vLLM's way."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress

from lmkernel.config import EngineConfig
from lmkernel.engine.llm_engine import LLMEngine
from lmkernel.engine.model_runner import select_cpu_path
from lmkernel.engine.request import RequestOutput
from lmkernel.engine.sampling import SamplingParams
from lmkernel.errors import LmkError
from lmkernel.layers.attention import AttentionMetadata
from lmkernel.loading import LoadedModel, load_model

Message = Mapping[str, str]
PROGRESS_THRESHOLD = 16  # show a progress bar from this many prompts on


@dataclass(frozen=True)
class ClassificationOutput:
    """The predicted label and the probability of every label."""

    label: str
    probs: dict[str, float]


class LLM:
    """Load a model once; run batches of prompts through continuous batching on a paged KV cache.

    `model` is an alias, a path (a LoRA adapter directory loads its base with the adapter merged), or
    an already loaded `LoadedModel` (then `dtype`, `device` and `quantization` are its own). The engine
    is described by `config` (an `EngineConfig`) with `overrides` applied, e.g.
    `LLM("smollm2-135m-instruct", kv_cache_memory="256MiB", max_num_seqs=16)`. A GGUF's weights stay in
    their shipped blocks on CPU (`quantization="auto"`, or "keep"); `quantization=None` dequantizes them.
    `lora` ({name: adapter directory}) serves PEFT LoRA adapters beside the base model, picked per request
    with `SamplingParams(lora=name)`, in `max_loras` slots (default: as many as given; more leave room for
    adapters loaded while serving); a `LoadedModel` given here is left as it is (the adapters wrap a copy
    that shares its weights).
    """

    def __init__(
        self,
        model: str | LoadedModel,
        config: EngineConfig | None = None,
        *,
        lora: Mapping[str, str | Path] | None = None,
        verbose: bool = True,
        **overrides: Any,
    ) -> None:
        self.config = EngineConfig.build(config, **overrides)
        c = self.config
        select_cpu_path(c)  # before loading: which layers pack for decode depends on the kernels chosen
        self.loaded = (
            model if isinstance(model, LoadedModel)
            else load_model(model, dtype=c.dtype, device=c.device, quantization=c.quantization,
                            packed_cache=c.packed_cache)
        )
        self.tokenizer = self.loaded.tokenizer
        self.engine: LLMEngine | None = None
        self._ids = itertools.count()
        if self.loaded.config.is_encoder or self.loaded.config.is_classifier:  # embed() and classify(), no engine
            if lora or c.max_loras:
                raise LmkError(f"{self.loaded.source.path}: LoRA serving needs a generating decoder; load a "
                               "classifier's or an encoder's adapter as a model (LLM(adapter_dir))")
            return
        self.engine = LLMEngine.build(self.loaded, c, lora, owned=not isinstance(model, LoadedModel))
        self.loaded = self.engine.loaded
        if verbose:
            print(f"lmkernel: {startup_line(self.engine.stats())}")

    def _engine(self) -> LLMEngine:
        if self.engine is None:
            raise LmkError(f"{self.loaded.source.path}: generate() and chat() need a generating decoder; this encoder or classifier has embed() or classify()")
        return self.engine

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Complete every prompt (text or token ids); outputs come back in the order of the prompts."""
        engine = self._engine()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt, as text or ids
        params = sampling_params or SamplingParams()
        per_prompt = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"got {len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, p in zip(prompts, per_prompt):
                ids.append(str(next(self._ids)))
                engine.add_request(ids[-1], prompt, p)
        except Exception:
            for request_id in ids:
                engine.abort_request(request_id)
            engine.keep_pending(())
            raise
        return self._run(ids, use_tqdm and len(ids) >= PROGRESS_THRESHOLD)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], Mapping) else list(messages)
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, ids: list[str], progress: bool) -> list[RequestOutput]:
        engine = self._engine()
        wanted, done = set(ids), {}
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("generating", total=len(ids))
            while wanted - done.keys():
                for out in engine.step():
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
                        bar.advance(task)
        return [done[i] for i in ids]

    def embed(self, texts: str | Sequence[str], prompt_name: str | None = None, dimensions: int | None = None) -> torch.Tensor:
        """Sentence embeddings [N, dim] of an encoder model (sorted by length, no padding); `prompt_name` picks one
        of the model's prefixes ("query", "document"), `dimensions` cuts each embedding short and normalises it."""
        if not self.loaded.config.is_encoder:
            raise LmkError(f"{self.loaded.source.path}: embed() needs an encoder model; this is a decoder")
        return self.loaded.embed([texts] if isinstance(texts, str) else list(texts), prompt_name=prompt_name,
                                 dimensions=dimensions)

    @torch.inference_mode()
    def classify(self, texts: str | Sequence[str], max_batch_tokens: int = 8192) -> list[ClassificationOutput]:
        """Label probabilities from a sequence-classification checkpoint, batched by length without padding."""
        model = self.loaded.model
        if not self.loaded.config.is_classifier:
            raise LmkError(f"{self.loaded.source.path}: classify() needs a sequence-classification checkpoint")
        texts = [texts] if isinstance(texts, str) else list(texts)
        labels = self.loaded.config.id2label
        results: list[ClassificationOutput | None] = [None] * len(texts)
        for order, ids in self.loaded.length_batches(texts, max_batch_tokens):
            meta = AttentionMetadata.for_lengths([len(x) for x in ids], causal=not self.loaded.config.is_encoder)
            flat = torch.tensor([t for x in ids for t in x], device=self.loaded.device)
            positions = torch.tensor([p for x in ids for p in range(len(x))], device=self.loaded.device)
            probs = model.classify(model(flat, positions, meta), meta).float().softmax(-1).cpu()
            for i, row in zip(order, probs.tolist()):
                named = {labels.get(k, f"LABEL_{k}"): v for k, v in enumerate(row)}
                results[i] = ClassificationOutput(max(named, key=named.get), named)
        return results

    def stats(self) -> dict[str, float | int | str]:
        """The decode backend, and KV-cache, prefix-cache and scheduler counters (see `LLMEngine.stats`)."""
        return self._engine().stats()


def startup_line(stats: Mapping[str, Any]) -> str:
    """What an engine reports when it starts: its KV cache, the decode backend it picked and its speculation."""
    line = (f"KV cache of {stats['kv_blocks_total']} blocks x {stats['kv_block_size']} tokens = "
            f"{stats['kv_cache_tokens']} tokens; decode backend {stats['decode_backend']}; "
            f"CPU kernels {stats['cpu_path']}")
    if stats.get("deterministic"):
        line += "; deterministic (batch-invariant rows)"
    if stats.get("speculative", "off") != "off":
        line += f"; speculative decoding: {stats['speculative']}"
    return line
