"""llama.cpp (through llama-cpp-python, the optional `bench` extra) on the same GGUF file, as its users
run it at its best: every thread we use, a 1,024-token context, batches of 512 for prompts, greedy
tokens read from the last row of logits."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from lmkernel.errors import LmkError

CONTEXT = 1024
BATCH = 512


def _library() -> object:
    try:
        import llama_cpp
    except ImportError:
        raise LmkError("the llama.cpp peer is not installed: CMAKE_ARGS=-DGGML_NATIVE=ON pip install -e '.[bench]' "
                       "(builds llama-cpp-python from source, several minutes)") from None
    return llama_cpp


class LlamaCppPeer:
    """One llama.cpp context over a GGUF file; `decode` and `prefill` time it the way `lmk bench` times
    lmkernel (greedy tokens, one at a time; one prompt in one call)."""

    def __init__(self, path: Path, threads: int) -> None:
        llama_cpp = _library()
        self.lib = llama_cpp
        self.model = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=CONTEXT,
                                     n_batch=BATCH, verbose=False)
        self.vocab = self.model.n_vocab()

    def build(self) -> str:
        """What the peer's build runs on (llama.cpp's own system line: AVX512, AMX_INT8, ... = 0 or 1)."""
        info = self.lib.llama_print_system_info()
        return (info.decode() if isinstance(info, bytes) else str(info)).strip()

    def _next_token(self) -> int:
        logits = self.lib.llama_get_logits_ith(self.model.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(self.vocab,))))

    def decode_ms(self, prompt: list[int], new_tokens: int) -> float:
        """Milliseconds per greedy token after `prompt` (its prefill not timed)."""
        self.model.reset()
        self.model.eval(prompt)
        token = self._next_token()
        start = time.perf_counter()
        for _ in range(new_tokens):
            self.model.eval([token])
            token = self._next_token()
        return (time.perf_counter() - start) * 1000 / new_tokens

    def prefill_tokens_per_second(self, prompt: list[int]) -> float:
        """Prompt tokens per second for one prompt evaluated from an empty context (one call)."""
        self.model.reset()
        start = time.perf_counter()
        self.model.eval(prompt)
        self._next_token()
        return len(prompt) / (time.perf_counter() - start)

    def close(self) -> None:
        self.model.close()


def load_script(path: Path, threads: int) -> str:
    """A Python program that loads `path` with llama.cpp and prints the seconds from the file to the
    first token and the resident memory that loading added (run in a fresh process: see `bench.load`)."""
    return f"""
import json, time
from lmkernel.bench.load import resident_bytes
import llama_cpp
before = resident_bytes()
start = time.perf_counter()
model = llama_cpp.Llama(model_path={str(path)!r}, n_threads={threads}, n_threads_batch={threads}, n_ctx={CONTEXT},
                        n_batch={BATCH}, verbose=False)
model.eval(model.tokenize(b"The capital of France is"))
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "resident": resident_bytes() - before}}))
"""
