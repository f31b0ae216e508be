"""AsyncEngine: streamed deltas add up to the full output; leaving or cancelling a stream frees its blocks."""

from __future__ import annotations

import asyncio

import pytest
import torch

from lmkernel import LLM, SamplingParams
from lmkernel.engine.async_engine import AsyncEngine
from lmkernel.engine.llm_engine import PromptTooLongError
from lmkernel.memory.kv_cache import bytes_per_block


@pytest.fixture(scope="module")
def llm(smollm) -> LLM:
    return LLM(smollm, kv_cache_memory=64 * bytes_per_block(smollm.config, 16, torch.float32), max_model_len=512, verbose=False)


def test_streams_concurrently_and_cancellation_frees_blocks(llm):
    greedy = SamplingParams(temperature=0, max_tokens=20)
    expected = [llm.generate([p], greedy)[0].outputs[0].text for p in ("The sea is", "Lobsters live")]

    async def scenario():
        engine = AsyncEngine(llm.engine)

        async def collect(prompt, rid):
            pieces, last = [], None
            async for out in engine.generate(prompt, greedy, rid):
                pieces.append(out.outputs[0].delta_text)
                last = out
            return "".join(pieces), last

        async def leave_early():
            seen = 0
            async for _ in engine.generate("A very long story:", SamplingParams(temperature=0, max_tokens=400), "early"):
                seen += 1
                if seen == 3:
                    break
            return seen

        async def cancelled():
            async for _ in engine.generate("Another long story:", SamplingParams(temperature=0, max_tokens=400), "cancel"):
                pass

        victim = asyncio.create_task(cancelled())
        results = await asyncio.gather(collect("The sea is", "a"), collect("Lobsters live", "b"), leave_early())
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        for _ in range(50):  # the abort lands at the next step boundary
            if not llm.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.05)
        with pytest.raises(PromptTooLongError):
            async for _ in engine.generate("x" * 10, SamplingParams(max_tokens=600), "too-long"):
                pass
        await engine.stop()
        return results

    (text_a, last_a), (text_b, _), seen = asyncio.run(scenario())
    assert [text_a, text_b] == expected
    assert last_a.finished and last_a.outputs[0].finish_reason == "length" and seen == 3
    assert llm.engine.pool.num_free_blocks == llm.engine.pool.num_blocks
    assert not llm.engine.has_unfinished_requests()
