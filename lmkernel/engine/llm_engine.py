"""The engine core's step loop: schedule, run, update; `output_processor` turns the tokens into text and ends."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lmkernel.config import EngineConfig
from lmkernel.engine.adapters import LoraAdapters, PreparedAdapter, UnknownAdapterError, shared_copy
from lmkernel.engine.model_runner import ModelRunner, ModelRunnerOutput, select_cpu_path
from lmkernel.engine.output_processor import OutputProcessor
from lmkernel.engine.request import CheckedPrompt, CoreOutput, Request, RequestOutput, RequestStatus, token_end
from lmkernel.engine.sampling import SamplingParams
from lmkernel.engine.scheduler import Scheduler, SchedulerOutput
from lmkernel.engine.speculative import build_speculator
from lmkernel.engine.structured import GrammarCompiler, StructuredOutputs
from lmkernel.errors import AdapterError, ContextLengthError, LmkError
from lmkernel.layers import cpu_kernels
from lmkernel.loading import LoadedModel, load_model
from lmkernel.memory.kv_cache import allocate_kv_cache
from lmkernel.memory.kv_manager import KVCacheManager
from lmkernel.models.virtual_tokens import VirtualTokens


class PromptTooLongError(ContextLengthError):
    """A request that could never fit: prompt plus max_tokens past the context or the whole cache."""


def check_decoder(loaded: LoadedModel) -> None:
    """The one check that a model can generate: an encoder is refused, saying where it is served instead."""
    if loaded.config.is_encoder:
        raise LmkError(f"{loaded.source.path}: completions and chat need a decoder; this is an encoder model (serve it "
                       "with --embedding-model, or use LLM.embed)")


class LLMEngine:
    """Continuous batching over a paged KV cache for one decoder model, and the LoRA adapters
    `adapters` applied to it (requests pick one with `SamplingParams.lora`)."""

    @classmethod
    def build(cls, model: str | LoadedModel, config: EngineConfig,
              lora: Mapping[str, str | Path] | None = None, owned: bool = False) -> LLMEngine:
        """Load `model` (unless loaded already) as `config` says and start an engine on it, with the LoRA
        adapters `lora` ({name: directory}) in `config.max_loras` slots. A `LoadedModel` given is left as it
        is (the adapters wrap a copy that shares its weights) unless `owned`: loaded for this engine alone."""
        select_cpu_path(config)  # before loading: which layers pack for decode depends on the kernels chosen
        loaded = model if isinstance(model, LoadedModel) else load_model(
            model, dtype=config.dtype, device=config.device, quantization=config.quantization,
            packed_cache=config.packed_cache)
        check_decoder(loaded)  # before adapters wrap its layers
        adapters = None
        if lora or config.max_loras:
            if isinstance(model, LoadedModel) and not owned:
                loaded = dataclasses.replace(loaded, model=shared_copy(loaded.model))
            adapters = LoraAdapters(loaded.model, loaded.config, lora or {}, config.max_loras)
        return cls(loaded, config, adapters)

    def __init__(self, loaded: LoadedModel, config: EngineConfig, adapters: LoraAdapters | None = None) -> None:
        check_decoder(loaded)
        if isinstance(loaded.model, VirtualTokens):
            raise LmkError(f"{loaded.source.path}: a {loaded.model.kind}-tuning adapter adds {loaded.model.num_virtual_tokens} virtual "
                           "tokens before every sequence, which the paged engine does not serve and no merge can fold "
                           "into the weights; serve the base model with a LoRA, AdaLoRA or IA3 adapter instead (those "
                           "merge: `lmk lora merge BASE DIR -o OUT`), or score with the adapter offline "
                           "(load_model(BASE, adapter=DIR))")
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.config = config
        self.loaded, self.tokenizer = loaded, loaded.tokenizer
        self.kv_cache = allocate_kv_cache(loaded.config, config.cache, loaded.dtype, loaded.device)
        self.pool = KVCacheManager(self.kv_cache.num_blocks, config.block_size, self.kv_cache.groups.windows,
                                   config.enable_prefix_caching)
        self.kv_block_bytes = self.kv_cache.block_bytes  # K and V of one block (one KV group's layers)
        self.scheduler = Scheduler(config.scheduler(loaded.config), self.pool)
        self.adapters = adapters
        # Generation ends at any end-of-sequence id the model lists, and at the tokenizer's own.
        self.eos_ids = frozenset(loaded.config.eos_token_ids) | (
            {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set())
        self.runner = ModelRunner(loaded.model, self.kv_cache, self.tokenizer, loaded.device, config, adapters,
                                  self.eos_ids)
        self.speculator = build_speculator(config, loaded.config.vocab_size, self.tokenizer,
                                           self.pool.capacity_tokens)
        self.outputs = OutputProcessor(self.tokenizer)
        self.arrivals = 0
        self.steps = 0
        self._pending: list[RequestOutput] = []  # outputs of aborted requests, reported at the next step
        self._grammars: GrammarCompiler | None = None
        self._unloading: set[str] = set()  # adapters refusing new requests until theirs finish
        self._grammars_lock = threading.Lock()

    @property
    def grammars(self) -> GrammarCompiler:
        """Compiles structured-output grammars against this model's vocabulary (built on first use, ~1 s)."""
        with self._grammars_lock:  # the server compiles grammars on worker threads
            if self._grammars is None:
                self._grammars = GrammarCompiler(self.tokenizer.backend.to_str(), self.loaded.config.vocab_size,
                                                 sorted(self.eos_ids))
        return self._grammars

    @property
    def max_model_len(self) -> int:
        return self.scheduler.config.max_model_len

    # What the front (AsyncEngine, LLM) may ask and tell the engine: it reads no field of the engine's own.

    @property
    def vocab_size(self) -> int:
        return self.loaded.config.vocab_size

    def max_tokens_per_request(self) -> int:
        """Prompt plus output tokens one request may hold (the context, or what the whole KV cache can hold)."""
        return self.scheduler.max_tokens_per_request()

    @property
    def kv_cache_tokens(self) -> int:
        return self.pool.capacity_tokens

    def compile_grammar(self, structured: StructuredOutputs) -> Any:
        """A matcher for a request's structured-output constraint (thread-safe: servers compile off the loop)."""
        return self.grammars.matcher(structured)

    def servable_adapters(self) -> list[str]:
        """Adapters new requests may name (one being unloaded is not among them)."""
        return [n for n in self.lora_names if n not in self._unloading]

    def has_adapter(self, name: str) -> bool:
        return self.adapters is not None and name in self.adapters.names

    def prepare_adapter(self, name: str, path: str) -> PreparedAdapter:
        """Read and check an adapter's files (any thread; `load_adapter` installs it between steps)."""
        if self.adapters is None:
            raise AdapterError("this engine serves no LoRA adapters")
        return self.adapters.prepare(name, path)

    def refuse_adapter(self, name: str, refuse: bool = True) -> None:
        """Refuse (or again accept) new requests for adapter `name`, before it is unloaded."""
        if refuse:
            self._unloading.add(name)
        else:
            self._unloading.discard(name)

    def abort_all(self) -> None:
        """Abort every request, and forget the outputs not yet reported (a failed step ends them all)."""
        for request_id in self.outputs.request_ids():
            self.abort_request(request_id)
        self._pending.clear()

    def keep_pending(self, request_ids: Collection[str]) -> None:
        """Forget the aborted requests' outputs still to report, but those of `request_ids` (someone awaits them)."""
        self._pending = [o for o in self._pending if o.request_id in request_ids]

    def kv_blocks_held(self, request_id: str) -> int:
        """KV blocks a request holds across its KV groups (each `stats()["kv_block_bytes"]` bytes)."""
        return self.pool.blocks_held(request_id)

    def reset_kv_peak(self) -> None:
        """Start `stats()["kv_blocks_peak"]` again from the blocks held now."""
        self.pool.reset_peak()

    def request_ids(self) -> list[str]:
        """The ids of the requests queued or running."""
        return self.outputs.request_ids()

    @property
    def lora_names(self) -> list[str]:
        """The LoRA adapters requests may name in `SamplingParams.lora`."""
        return list(self.adapters.names) if self.adapters is not None else []

    def add_request(
        self, request_id: str, prompt: str | Sequence[int] | CheckedPrompt, params: SamplingParams | None = None,
        priority: int = 0, matcher: Any = None,
    ) -> None:
        """Queue a request; refuse at once one that could never fit. `prompt`: text, ids, or a `CheckedPrompt`
        (which carries its params: pass none). `matcher`: its structured-output grammar already compiled by
        `grammars.matcher` (off the engine's thread); else it is compiled here."""
        if request_id in self.outputs.groups:
            raise ValueError(f"request id '{request_id}' is already in use")
        if isinstance(prompt, CheckedPrompt):
            if params is not None:
                raise ValueError("a CheckedPrompt carries its own SamplingParams: pass params=None")
            checked = prompt
        else:
            checked = self.check_prompt(prompt, params if params is not None else SamplingParams())
        text, ids, params = checked.text, list(checked.ids), checked.params
        if params.lora is not None:
            if self.adapters is None:
                raise UnknownAdapterError(f"SamplingParams.lora is '{params.lora}', but this engine serves no LoRA "
                                          "adapters (start it with LLM(model, lora={name: path}))")
            self.adapters.slot(params.lora)
            if params.lora in self._unloading:
                raise UnknownAdapterError(f"LoRA adapter '{params.lora}' is being unloaded")
            self.adapters.touch(params.lora)
        # A grammar is compiled (and refused when invalid) before anything is queued.
        if params.structured_outputs is not None and matcher is None:
            matcher = self.grammars.matcher(params.structured_outputs)
        sequence_ids = [request_id if params.n == 1 else f"{request_id}#{j}" for j in range(params.n)]
        for j, child_id in enumerate(sequence_ids):
            child_params = params if j == 0 else dataclasses.replace(params, prompt_logprobs=None)
            request = Request(
                child_id, ids, child_params, self.arrivals, priority,
                prompt_logprobs=[None] if child_params.prompt_logprobs is not None else [],
                matcher=None if matcher is None else matcher if j == 0 else matcher.deep_copy(),
                adapter_salt=self.adapters.salt(params.lora) if params.lora is not None and self.adapters else "",
            )
            self.arrivals += 1
            if params.seed is not None:
                self.runner.add_generator(child_id, params.seed + j)
            self.scheduler.add_request(request)
        self.outputs.add(request_id, text, ids, params, sequence_ids)

    def check_prompt(self, prompt: str | Sequence[int], params: SamplingParams) -> CheckedPrompt:
        """The one check of a prompt against this engine: ids in the vocabulary, prompt plus max_tokens within
        what one request may hold. Returns it with max_tokens filled in (what is left) when unset; raises
        ValueError, or PromptTooLongError, naming what is wrong. Constant limits only: safe while a step runs."""
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("prompt is empty: expected at least one token")
        vocab = self.loaded.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        limit = self.scheduler.max_tokens_per_request()
        if params.max_tokens is None:
            params = dataclasses.replace(params, max_tokens=max(limit - len(ids), 1))
        if len(ids) + params.max_tokens > limit:
            raise PromptTooLongError(
                f"prompt of {len(ids)} tokens plus max_tokens {params.max_tokens} is {len(ids) + params.max_tokens} "
                f"tokens, more than this engine can hold for one request ({limit}: context length "
                f"{self.max_model_len}, KV cache {self.pool.capacity_tokens} tokens; the context is "
                f"bounded by {self.loaded.config.context_limit_reason})"
            )
        return CheckedPrompt(tuple(ids), params, text)

    def adapters_in_use(self) -> set[str]:
        """Adapters that unfinished requests use."""
        live = [*self.scheduler.running, *self.scheduler.waiting]
        return {r.sampling_params.lora for r in live if r.sampling_params.lora is not None}

    def load_adapter(self, adapter: PreparedAdapter) -> str | None:
        """Install a prepared adapter (between steps); when every slot is taken, the least recently used
        adapter no request is using makes room. Returns the name of the adapter dropped, if any."""
        if self.adapters is None:
            raise AdapterError("this engine serves no LoRA adapters (start it with max_loras or lora)")
        if adapter.name in self.adapters.names:
            raise AdapterError(f"an adapter named '{adapter.name}' is already loaded")
        dropped = None
        if self.adapters.full:
            dropped = self.adapters.least_recently_used(exclude=self.adapters_in_use() | self._unloading)
            if dropped is None:
                raise AdapterError(f"all {self.adapters.capacity} adapter slots hold adapters in use; retry when one is free")
            self.adapters.remove(dropped)
        self.adapters.install(adapter)
        return dropped

    def unload_adapter(self, name: str) -> None:
        """Remove an adapter no request uses any more (between steps)."""
        if self.adapters is None:
            raise UnknownAdapterError(f"LoRA adapter '{name}' is not loaded; this engine serves none")
        if name in self.adapters_in_use():
            raise AdapterError(f"LoRA adapter '{name}' is in use")
        self.adapters.remove(name)
        self._unloading.discard(name)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request in any state and free its blocks now; False if it is unknown or already done."""
        aborted = self.outputs.abort(request_id)
        if aborted is None:
            return False
        output, running = aborted
        for sequence_id in running:
            self._release(sequence_id, RequestStatus.FINISHED_ABORTED)
        self._pending.append(output)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    def step(self) -> list[RequestOutput]:
        """One engine iteration: the core's step, then its tokens turned into outputs; the outputs that changed."""
        return self.process_outputs(self.core_step())

    def core_step(self) -> list[CoreOutput]:
        """The engine core's iteration: `schedule()`, `execute()`, `update()`; what each sequence got."""
        times, start = self.runner.times, time.perf_counter()
        drafts = self._propose() if self.speculator is not None else {}
        proposing = time.perf_counter() - start
        plan = self.scheduler.schedule(drafts)
        if plan.is_empty:
            return []
        constrained = any(c.request.matcher is not None for c in plan.chunks)
        allowed = self.grammars.allowed_for(plan.chunks) if constrained else None
        times.schedule += time.perf_counter() - start
        start = time.perf_counter()
        result = self.runner.execute(plan, allowed)
        if self.speculator is not None:
            self.speculator.learn_step(plan.chunks, result.sampled, proposing + time.perf_counter() - start)
        start = time.perf_counter()
        self.steps += 1
        outputs = self._update(plan, result)
        times.process += time.perf_counter() - start
        return outputs

    def process_outputs(self, core_outputs: list[CoreOutput]) -> list[RequestOutput]:
        """The core's outputs as the callers' (text, stop strings: `OutputProcessor`), outside the core's step; a
        sequence a stop string ended is released. Call it before the next `core_step`."""
        start = time.perf_counter()
        outputs, self._pending = self._pending, []
        processed, stopped = self.outputs.process(core_outputs)
        for sequence_id in stopped:
            self._release(sequence_id, RequestStatus.FINISHED_STOPPED)
        self.runner.times.process += time.perf_counter() - start
        return outputs + processed

    def _propose(self) -> dict[str, list[int]]:
        """Proposals for this step's decodes; a grammar's requests keep only those their grammar allows."""
        running = self.scheduler.running
        decoding = [r for r in running if r.num_tokens - r.num_computed_tokens == 1]
        prompts_pending = bool(self.scheduler.waiting) or len(decoding) < len(running)
        drafts = self.speculator.propose(decoding, len(running), self.max_model_len, prompts_pending)
        for r in decoding:
            if r.request_id in drafts and r.matcher is not None:
                del drafts[r.request_id][r.matcher.validate_tokens(drafts[r.request_id]):]
        return drafts

    def _update(self, plan: SchedulerOutput, result: ModelRunnerOutput) -> list[CoreOutput]:
        """Each sequence's new tokens up to where its tokens end it, handed to the scheduler (which alone changes a
        request); ended sequences are released."""
        kept: dict[str, list[int]] = {}
        outputs = []
        for chunk in plan.chunks:
            request = chunk.request
            tokens = result.sampled.get(request.request_id)
            if tokens is None and request.request_id not in result.prompt_logprobs:
                continue
            out = CoreOutput(request.request_id, [], new_prompt_logprobs=result.prompt_logprobs.get(request.request_id, []),
                             queue_seconds=None if request.first_scheduled_time is None
                             else request.first_scheduled_time - request.arrival_time)
            for token in tokens or []:  # taken one at a time, up to an end
                out.new_token_ids.append(token)
                end = token_end(request, token, request.num_output_tokens + len(out.new_token_ids), self.eos_ids,
                                self.max_model_len)
                if end is not None:
                    out.finish_reason, out.stop_reason = end
                    break
            if request.request_id in result.logprobs:
                out.new_logprobs = result.logprobs[request.request_id][: len(out.new_token_ids)]
            kept[request.request_id] = out.new_token_ids
            outputs.append(out)
        self.scheduler.update(plan, kept, result.logprobs, result.prompt_logprobs)
        for out in outputs:
            if out.finish_reason is not None:
                status = RequestStatus.FINISHED_STOPPED if out.finish_reason == "stop" else RequestStatus.FINISHED_LENGTH
                self._release(out.request_id, status)
        return outputs

    def _release(self, request_id: str, status: RequestStatus) -> None:
        self.scheduler.finish(request_id, status)
        self.runner.drop_request(request_id)
        if self.speculator is not None:
            self.speculator.drop(request_id)

    def stats(self) -> dict[str, float | int | str]:
        """The decode backend in use, and counters of the cache, the prefix cache and the scheduler."""
        return {
            "decode_backend": self.runner.decode_backend,
            "deterministic": self.config.deterministic,
            "cpu_path": cpu_kernels.current_path() if self.runner.device.type == "cpu" else "none",
            "kv_blocks_total": self.pool.num_blocks,
            "kv_blocks_free": self.pool.num_free_blocks,
            "kv_block_size": self.pool.block_size,
            "kv_cache_tokens": self.pool.capacity_tokens,
            "kv_groups": len(self.pool.windows),
            "kv_blocks_peak": self.pool.peak_blocks,
            "kv_block_bytes": self.kv_block_bytes,
            "prefix_cache_hits": self.pool.stats.hits,
            "prefix_cache_queries": self.pool.stats.queries,
            "prefix_cache_hit_rate": self.pool.stats.hit_rate,
            "preemptions": self.scheduler.num_preemptions,
            "steps": self.steps,
            "kv_tokens_stored": sum(r.num_computed_tokens for r in self.scheduler.running),
            # Token slots per layer: a block holds one group's layers, so the blocks held count once per group.
            "kv_slots_allocated": sum(self.pool.blocks_held(r.request_id) for r in self.scheduler.running)
            * self.pool.block_size // len(self.pool.windows),
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "speculative": self.speculator.describe() if self.speculator is not None else "off",
            **(self.speculator.stats.as_stats() if self.speculator is not None else {}),
            **self.runner.times.as_stats(),
        }

