"""Speculative decoding against plain decoding, batch 1, same engine, same prompts, in one run.

Two workloads: code editing (a function in the prompt, asked to be changed a little: the answer copies most
of its context, where prompt lookup pays) and ordinary chat (where proposals mostly fail and speculation
must back off). The prompts were written for this benchmark and none was used to choose its settings.
Greedy decoding, so every speculative output must equal the plain one token for token.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lmkernel.bench.serve import LoadResult
from lmkernel.bench.workload import Workload
from lmkernel.engine.llm import LLM
from lmkernel.engine.sampling import SamplingParams
from lmkernel.loading import LoadedModel

_FUNCTIONS = [
    ("def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n",
     "Make it return 0.0 for an empty list instead of failing."),
    ("def find_user(users, name):\n    for user in users:\n        if user['name'] == name:\n            return user\n    return None\n",
     "Make the name comparison case-insensitive."),
    ("def read_lines(path):\n    with open(path) as f:\n        lines = f.readlines()\n    return [line.rstrip('\\n') for line in lines]\n",
     "Skip lines that are empty after stripping."),
    ("def clamp(x, low, high):\n    if x < low:\n        return low\n    if x > high:\n        return high\n    return x\n",
     "Raise a ValueError when low is greater than high."),
    ("def word_counts(text):\n    counts = {}\n    for word in text.split():\n        counts[word] = counts.get(word, 0) + 1\n    return counts\n",
     "Lower-case every word before counting it."),
    ("class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        self.items.append(item)\n\n"
     "    def pop(self):\n        return self.items.pop()\n",
     "Add a peek method that returns the top item without removing it."),
    ("def fizzbuzz(n):\n    out = []\n    for i in range(1, n + 1):\n        if i % 15 == 0:\n            out.append('FizzBuzz')\n"
     "        elif i % 3 == 0:\n            out.append('Fizz')\n        elif i % 5 == 0:\n            out.append('Buzz')\n"
     "        else:\n            out.append(str(i))\n    return out\n",
     "Rename the function to fizz_buzz and the list `out` to `result`."),
    ("def parse_config(text):\n    config = {}\n    for line in text.splitlines():\n        key, value = line.split('=')\n"
     "        config[key.strip()] = value.strip()\n    return config\n",
     "Ignore lines that start with '#'."),
    ("def retry(fn, attempts):\n    for i in range(attempts):\n        try:\n            return fn()\n        except Exception:\n"
     "            pass\n    raise RuntimeError('all attempts failed')\n",
     "Sleep one second between attempts (import time)."),
    ("def merge_sorted(a, b):\n    i = j = 0\n    out = []\n    while i < len(a) and j < len(b):\n        if a[i] <= b[j]:\n"
     "            out.append(a[i])\n            i += 1\n        else:\n            out.append(b[j])\n            j += 1\n"
     "    return out + a[i:] + b[j:]\n",
     "Add type hints for lists of ints."),
    ("function sum(values) {\n  let total = 0;\n  for (const v of values) {\n    total += v;\n  }\n  return total;\n}\n",
     "Change `let total` to use `var` and add a JSDoc comment."),
    ("def is_prime(n):\n    if n < 2:\n        return False\n    for d in range(2, n):\n        if n % d == 0:\n            return False\n"
     "    return True\n",
     "Only test divisors up to the square root of n."),
    ("def to_celsius(fahrenheit):\n    return (fahrenheit - 32) * 5 / 9\n\n\ndef to_fahrenheit(celsius):\n    return celsius * 9 / 5 + 32\n",
     "Round both results to two decimals."),
    ("def chunks(items, size):\n    out = []\n    for start in range(0, len(items), size):\n        out.append(items[start:start + size])\n"
     "    return out\n",
     "Raise a ValueError when size is not positive."),
    ("def unique(items):\n    seen = set()\n    out = []\n    for item in items:\n        if item not in seen:\n            seen.add(item)\n"
     "            out.append(item)\n    return out\n",
     "Add a docstring that explains that the order is kept."),
    ("def factorial(n):\n    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result\n",
     "Raise a ValueError for negative n."),
    ("def flatten(nested):\n    out = []\n    for item in nested:\n        if isinstance(item, list):\n            out.extend(flatten(item))\n"
     "        else:\n            out.append(item)\n    return out\n",
     "Treat tuples like lists."),
    ("def count_vowels(text):\n    count = 0\n    for ch in text:\n        if ch in 'aeiou':\n            count += 1\n    return count\n",
     "Count upper-case vowels too."),
    ("def format_price(amount, currency):\n    return f'{amount:.2f} {currency}'\n\n\ndef total_price(items):\n"
     "    return sum(item['price'] * item['quantity'] for item in items)\n",
     "Make format_price put the currency before the amount."),
    ("def invert(mapping):\n    out = {}\n    for key, value in mapping.items():\n        out[value] = key\n    return out\n",
     "Raise a ValueError when two keys share a value."),
]
EDIT_PROMPTS = [f"Here is some code:\n\n```\n{code}```\n\n{ask} Reply with the whole changed code." for code, ask in _FUNCTIONS]
CHAT_PROMPTS = [
    "What are three good habits for staying focused while working from home?",
    "Explain in a short paragraph why the sky looks blue.",
    "Suggest a name for a small bakery that sells bread and coffee, and say why.",
    "What is the difference between a virus and a bacterium?",
    "Write a haiku about autumn rain.",
    "Give me two tips for a first job interview.",
    "How does a refrigerator keep food cold?",
    "Summarise the plot of Romeo and Juliet in three sentences.",
]


@dataclass
class Run:
    """One setting over one workload: decode time (first token to last), tokens, and what speculation did."""

    label: str
    tokens: int
    decode_seconds: float
    outputs: list[list[int]]
    acceptance: float = 0.0
    tokens_per_check: float = 0.0

    @property
    def tok_s(self) -> float:
        return (self.tokens - len(self.outputs)) / self.decode_seconds


def _one(llm: LLM, rid: str, prompt: list[int], params: SamplingParams) -> tuple[list[int], float]:
    """One prompt alone (batch 1): its tokens, and the seconds from its first token to its last."""
    engine = llm.engine
    engine.add_request(rid, prompt, params)
    first = None
    ids: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if first is None and out.outputs[0].token_ids:
                first = time.perf_counter()
            ids = out.outputs[0].token_ids
    return list(ids), time.perf_counter() - first


def run_alternating(llms: dict[str, LLM], prompts: Sequence[list[int]], params: SamplingParams) -> list[Run]:
    """Each prompt through every engine in turn, so that the machine's drift falls on all of them alike."""
    runs = {label: Run(label, 0, 0.0, []) for label in llms}
    before = {label: llm.stats() for label, llm in llms.items()}
    for i, prompt in enumerate(prompts):
        for label, llm in llms.items():
            ids, seconds = _one(llm, f"{label}-{i}", prompt, params)
            r = runs[label]
            r.tokens, r.decode_seconds = r.tokens + len(ids), r.decode_seconds + seconds
            r.outputs.append(ids)
    for label, llm in llms.items():
        after, was, r = llm.stats(), before[label], runs[label]
        if "spec_proposed_tokens" in after:
            proposed = after["spec_proposed_tokens"] - was["spec_proposed_tokens"]
            accepted = after["spec_accepted_tokens"] - was["spec_accepted_tokens"]
            checks = after["spec_checks"] - was["spec_checks"]
            r.acceptance = accepted / proposed if proposed else 0.0
            r.tokens_per_check = (accepted + checks) / checks if checks else 0.0
    return list(runs.values())


def chat_prompts(llm: LLM, texts: Sequence[str]) -> list[list[int]]:
    return [llm.tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True)
            for t in texts]


def label(model: str, k: int) -> str:
    return f"{'ngram' if model == 'ngram' else 'draft'} x{k}"


def compare(loaded: LoadedModel, settings: Sequence[tuple[str, int]], workloads: dict[str, list[str]],
            max_tokens: int, kv_cache_memory: str) -> dict[str, list[Run]]:
    """Per workload: plain decoding and each (proposer, tokens) setting on engines over one loaded model,
    prompt by prompt in turn."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    llms = {"plain": LLM(loaded, kv_cache_memory=kv_cache_memory, enable_prefix_caching=False, verbose=False)}
    for model, k in settings:
        llms[label(model, k)] = LLM(loaded, kv_cache_memory=kv_cache_memory, enable_prefix_caching=False, verbose=False,
                                    speculative={"model": model, "num_speculative_tokens": k})
    prompts = {name: chat_prompts(llms["plain"], texts) for name, texts in workloads.items()}
    return {name: run_alternating(llms, p, params) for name, p in prompts.items()}


def serve_compare(model: str, settings: Sequence[tuple[str, int]], prompts: list[list[int]], levels: Sequence[int],
                  max_tokens: int, kv_cache_memory: str, log_dir: Path) -> dict[str, dict[int, LoadResult]]:
    """The code-editing prompts through `lmk serve` without speculation and with each setting: streaming clients
    at each level of concurrency, greedy, answers ending where the model ends them."""
    from lmkernel.bench.serve import run_http, start_server_process

    work = Workload(prompts, [max_tokens] * len(prompts))
    servers = {}
    try:  # every server up at once (an idle one takes no CPU), each level run on each in turn
        for name, flags in [("plain", [])] + [(label(m, k), ["--speculative-model", m, "--num-speculative-tokens", str(k)])
                                              for m, k in settings]:
            servers[name] = start_server_process([model, "--kv-cache-memory", kv_cache_memory, *flags],
                                                 log_dir / f"{name}.log")
            run_http(servers[name], model, Workload(prompts[:2], [8, 8]), 2, ignore_eos=False)  # warm
        results: dict[str, dict[int, LoadResult]] = {name: {} for name in servers}
        for c in levels:
            for name, server in servers.items():
                results[name][c] = run_http(server, model, work, c, ignore_eos=False)
    finally:
        for server in servers.values():
            server.stop()
    return results
