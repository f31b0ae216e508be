"""`AsyncEngine`: an asyncio front over `LLMEngine` that streams outputs and aborts on cancellation.

One background task owns the engine. The core's steps run in a worker thread so the event loop never blocks,
and their tokens become text (detokenization, stop strings: `OutputProcessor`) on the loop between steps;
requests and aborts from coroutines are queued and applied between steps, so the engine is only
ever touched by one thread at a time (its grammar compiler excepted: a request's structured-output
grammar compiles on a worker thread before the request is queued).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lmkernel.config import EngineConfig
from lmkernel.engine.adapters import UnknownAdapterError
from lmkernel.engine.llm_engine import LLMEngine
from lmkernel.engine.request import CheckedPrompt, RequestOutput
from lmkernel.engine.sampling import SamplingParams
from lmkernel.loader.tokenizer import Tokenizer
from lmkernel.loading import LoadedModel


class AsyncEngine:
    """Many concurrent `generate` streams over one engine step loop."""

    @classmethod
    def build(cls, model: str | LoadedModel, config: EngineConfig,
              lora: Mapping[str, str | Path] | None = None, owned: bool = False) -> AsyncEngine:
        """An engine on `model` as `config` describes it (see `LLMEngine.build`), behind the async door."""
        return cls(LLMEngine.build(model, config, lora, owned))

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self.to_add: list[tuple[str, str | Sequence[int] | CheckedPrompt, SamplingParams | None, int, Any,
                                asyncio.Future[None]]] = []
        self.to_abort: list[str] = []
        self.to_call: list[tuple[Callable[[], Any], asyncio.Future[Any]]] = []
        self.wakeup = asyncio.Event()
        self.loop_task: asyncio.Task[None] | None = None
        self.snapshot = engine.stats()

    # What callers (the HTTP routes) may know of the engine, so they need nothing below it.

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    @property
    def max_tokens_per_request(self) -> int:
        """Prompt plus output tokens one request may hold (the context, or the whole KV cache if smaller)."""
        return self.engine.max_tokens_per_request()

    @property
    def kv_cache_tokens(self) -> int:
        return self.engine.kv_cache_tokens

    @property
    def lora_names(self) -> list[str]:
        """Adapters requests may name now (one being unloaded is not among them)."""
        return self.engine.servable_adapters()

    def check_prompt(self, prompt: str | Sequence[int], params: SamplingParams) -> CheckedPrompt:
        """The engine's own check of a prompt (see `LLMEngine.check_prompt`), for refusing a request before
        any of it is queued; `generate` takes the result as it is. Constant limits only: safe while a step runs."""
        return self.engine.check_prompt(prompt, params)

    def stats(self) -> dict[str, float | int | str]:
        """The engine's counters as of the last step boundary (safe to read while a step runs)."""
        return dict(self.snapshot)

    def start(self) -> None:
        if self.loop_task is None or self.loop_task.done():
            self.loop_task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.loop_task is not None:
            self.loop_task.cancel()
            try:
                await self.loop_task
            except asyncio.CancelledError:
                pass

    async def generate(
        self, prompt: str | Sequence[int] | CheckedPrompt, params: SamplingParams | None, request_id: str,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Yield a `RequestOutput` each time the request advances; `delta_text` holds what is new. A
        `CheckedPrompt` (from `check_prompt`) carries its params: pass None.

        Validation errors (a prompt that can never fit, say) raise here before anything is yielded.
        Leaving the loop early, or cancelling the consuming task, aborts the request and frees its blocks.
        """
        self.start()
        # A grammar compiles on a worker thread (up to its time limit), never on the engine's loop.
        matcher = None
        constraint = (prompt.params if isinstance(prompt, CheckedPrompt) else params or SamplingParams()).structured_outputs
        if constraint is not None:
            matcher = await asyncio.to_thread(self.engine.compile_grammar, constraint)
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.streams[request_id] = queue
        self.to_add.append((request_id, prompt, params, priority, matcher, accepted))
        self.wakeup.set()
        finished = False
        try:
            await accepted
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self.streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    async def between_steps(self, call: Callable[[], Any]) -> Any:
        """Run `call` on the engine between two steps (where nothing else touches it) and return its result."""
        self.start()
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.to_call.append((call, done))
        self.wakeup.set()
        return await done

    async def load_adapter(self, name: str, path: str) -> str | None:
        """Read and check a LoRA adapter on a worker thread, then install it between steps; the name of an
        adapter dropped to make room (the least recently used one not in use), if any."""
        prepared = await asyncio.to_thread(self.engine.prepare_adapter, name, path)
        return await self.between_steps(lambda: self.engine.load_adapter(prepared))

    async def unload_adapter(self, name: str, poll: float = 0.05) -> None:
        """Refuse new requests for the adapter, let the running ones finish, then remove it."""
        if not self.engine.has_adapter(name):
            raise UnknownAdapterError(f"LoRA adapter '{name}' is not loaded")
        self.engine.refuse_adapter(name)
        try:
            while await self.between_steps(lambda: name in self.engine.adapters_in_use()):
                await asyncio.sleep(poll)
            await self.between_steps(lambda: self.engine.unload_adapter(name))
        finally:
            self.engine.refuse_adapter(name, refuse=False)

    def abort(self, request_id: str) -> None:
        """Abort at the next step boundary (within one engine step)."""
        self.to_abort.append(request_id)
        self.wakeup.set()

    def _apply_pending(self) -> None:
        adds, self.to_add = self.to_add, []
        for request_id, prompt, params, priority, matcher, accepted in adds:
            try:
                self.engine.add_request(request_id, prompt, params, priority, matcher)
            except Exception as exc:  # handed to the caller's generate(), which raises it
                accepted.set_exception(exc)
            else:
                accepted.set_result(None)
        calls, self.to_call = self.to_call, []
        for call, done in calls:
            try:
                done.set_result(call())
            except Exception as exc:  # handed to the awaiting caller
                done.set_exception(exc)
        aborts, self.to_abort = self.to_abort, []
        for request_id in aborts:
            self.engine.abort_request(request_id)
        self.engine.keep_pending(self.streams)
        self.snapshot = self.engine.stats()

    async def _run(self) -> None:
        while True:
            self._apply_pending()
            if not self.engine.has_unfinished_requests():
                self.wakeup.clear()
                if not (self.to_add or self.to_abort or self.to_call):
                    await self.wakeup.wait()
                continue
            try:
                # The core's step on a worker thread; its tokens become text here, on the loop, before the next.
                outputs = self.engine.process_outputs(await asyncio.to_thread(self.engine.core_step))
            except Exception as exc:  # a failed step fails every stream rather than hanging them
                for queue in self.streams.values():
                    queue.put_nowait(exc)
                self.engine.abort_all()
                self.snapshot = self.engine.stats()
                continue
            self.snapshot = self.engine.stats()
            for out in outputs:
                queue = self.streams.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)
