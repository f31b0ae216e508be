"""What describes one generation engine besides its model: the KV cache, the scheduler's limits, speculative
decoding, and the `EngineConfig` that holds them all, checked once when it is made."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from lmkernel.config.model import ModelConfig
from lmkernel.config.settings import flag_of, setting
from lmkernel.errors import LmkError


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: tokens per block, and how much memory the blocks may take."""

    block_size: int = 16
    # Bytes for K and V of every layer; None means `memory_fraction` of the memory available.
    memory_bytes: int | None = None
    memory_fraction: float = 0.2
    enable_prefix_caching: bool = True
    hybrid: bool = True  # sliding-window layers give back the blocks that left their window (kv_cache.py)


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step limits: tokens computed in one forward, and sequences in one batch."""

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_model_len: int = 2048  # prompt + output tokens one request may reach
    prefill_tokens_with_decodes: int | None = None  # prompt tokens a step carries beside decodes; None: the budget



class EngineConfigError(LmkError, ValueError):
    """An engine setting out of range; the message names the setting as the `lmk serve` flag."""


_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "KIB": 2**10, "M": 1e6, "MB": 1e6, "MIB": 2**20,
          "G": 1e9, "GB": 1e9, "GIB": 2**30, "T": 1e12, "TB": 1e12, "TIB": 2**40}


def parse_bytes(value: str | int | float) -> int:
    """'2GiB', '512MB', '1.5G' or a number of bytes, as an int."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"kv_cache_memory must be positive; got {value}")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"kv_cache_memory must look like '2GiB', '512MB' or a byte count; got {value!r}")
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise ValueError(f"kv_cache_memory must be at least one byte; got {value!r}")
    return size


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: a proposer guesses the next `num_speculative_tokens` tokens of a sequence and the
    model checks them all in one forward (rows of a decode step), keeping the longest run it agrees with.

    `model`: "ngram" (prompt lookup: the tokens that followed the latest earlier occurrence of the sequence's
    last `prompt_lookup_max` .. `prompt_lookup_min` tokens) or a draft model (alias or path) sharing the
    target's vocabulary. Speculation pauses while more than `disable_by_batch_size` sequences run (a full
    batch already reads the weights once for many rows), and for a sequence whose proposals keep failing.
    """

    model: str
    num_speculative_tokens: int = 3
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    disable_by_batch_size: int = 4

    @property
    def is_ngram(self) -> bool:
        return self.model == "ngram"

    def describe(self) -> str:
        return f"{self.model} x{self.num_speculative_tokens}"


SPECULATIVE_FLAGS = {"model": "--speculative-model", "num_speculative_tokens": "--num-speculative-tokens",
                     "prompt_lookup_min": "--prompt-lookup-min", "prompt_lookup_max": "--prompt-lookup-max",
                     "disable_by_batch_size": "--speculative-disable-by-batch-size"}


def speculative_config(value: SpeculativeConfig | dict[str, Any] | str | None) -> SpeculativeConfig | None:
    """`EngineConfig.speculative` from what a caller gave: a SpeculativeConfig, a dict of its fields, a model
    name ("ngram" or a draft model), or None; checked, every bad value named with its flag."""
    if value is None or isinstance(value, SpeculativeConfig):
        spec = value
    elif isinstance(value, str):
        spec = SpeculativeConfig(value)
    elif isinstance(value, dict):
        unknown = sorted(set(value) - set(SPECULATIVE_FLAGS))
        if unknown:
            raise EngineConfigError(f"speculative: unknown setting {', '.join(map(repr, unknown))}; expected "
                                    f"{', '.join(SPECULATIVE_FLAGS)}")
        if "model" not in value:
            raise EngineConfigError("speculative: 'model' is missing (\"ngram\" or a draft model)")
        spec = SpeculativeConfig(**value)
    else:
        raise EngineConfigError(f"speculative must be None, a SpeculativeConfig, a dict of its fields or a model name; "
                                f"got {value!r}")
    if spec is None:
        return None

    def whole(v: object, low: int, high: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high

    rules = [
        ("model", isinstance(spec.model, str) and spec.model.strip() != "", '"ngram" or a draft model\'s alias or path'),
        ("num_speculative_tokens", whole(spec.num_speculative_tokens, 1, 15), "an integer in 1..15"),
        ("prompt_lookup_min", whole(spec.prompt_lookup_min, 1, 64), "an integer in 1..64"),
        ("prompt_lookup_max", whole(spec.prompt_lookup_max, 1, 64) and spec.prompt_lookup_max >= spec.prompt_lookup_min,
         f"an integer in 1..64, at least --prompt-lookup-min ({spec.prompt_lookup_min})"),
        ("disable_by_batch_size", whole(spec.disable_by_batch_size, 1, 4096), "an integer >= 1"),
    ]
    for name, ok, expected in rules:
        if not ok:
            raise EngineConfigError(f"{SPECULATIVE_FLAGS[name]} (SpeculativeConfig.{name}) must be {expected}; "
                                    f"got {getattr(spec, name)!r}")
    return spec


DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("auto", "keep", None)
DECODE_BACKENDS = ("auto", "fused", "paged-kernel", "torch")
CPU_PATHS = ("auto", "amx", "avx512-vnni", "avx512", "avx2")  # layers.cpu_kernels.PATHS


@dataclass(frozen=True)
class EngineConfig:
    """Everything that describes one generation engine besides its model: how the weights load, the paged
    KV cache, the scheduler's limits, threads, seed, adapter slots, the decode path and speculative decoding.

    The one record `LLM(model, **overrides)`, `AsyncEngine.build`, `lmk serve` and each Ray replica make;
    it is checked here, once, when it is made (every bad value named with its `lmk serve` flag), and
    passed down whole.
    """

    dtype: str = setting("auto", "auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16 or float16")
    device: str = setting("auto", "auto (CUDA when present), cpu, cuda or cuda:N")
    quantization: str | None = setting(
        "auto", "GGUF weights: auto (kept in their blocks on CPU, dequantized for CUDA), keep, or dequantize (None "
        "in Python)", cli=str)
    kv_cache_memory: int | None = setting(
        None, "bytes for K/V of every layer, e.g. 512MiB or 2GiB (default: a fraction of the free memory, "
        "--kv-cache-fraction)", cli=str | None)
    kv_cache_fraction: float = setting(0.2, "of the free memory, without --kv-cache-memory")
    block_size: int = setting(16, "tokens per KV-cache block (a power of two)")
    enable_prefix_caching: bool = setting(True, "reuse the KV blocks of prompts' shared prefixes")
    hybrid_kv_cache: bool = setting(True, "sliding-window layers (Gemma 3's local ones, Mistral's) give back the KV "
                                          "blocks that left their window")
    max_num_seqs: int = setting(64, "sequences in one engine step")
    max_num_batched_tokens: int = setting(2048, "tokens computed in one engine step")
    # None (offline generation: throughput first): the whole budget. A step of 2,048 prompt tokens takes ~10 s
    # for a 1.5B model on two cores, so `lmk serve` sets 512.
    prefill_tokens_with_decodes: int | None = setting(
        None, "prompt tokens a step carries while other sequences decode (bounds their inter-token latency); "
        "unset or 0: no cap beyond --max-num-batched-tokens")
    max_model_len: int | None = setting(None, "prompt + output tokens of one request (default: the model's context)")
    threads: int | None = setting(None, "torch threads, and so the CPU kernels' (default: torch's; with --ray: "
                                             "--replica-cpus)")
    seed: int = setting(0, "the sampler's seed for requests without their own")
    max_loras: int | None = setting(None, "LoRA adapter slots (default: as many as adapters given at start; at least 4 "
                                          "with --allow-runtime-lora); loading past it drops the least recently used one "
                                          "not in use")
    decode_backend: str = setting("auto", "auto (the fastest the model offers on this device), fused, paged-kernel "
                                          "or torch")
    cpu_path: str = setting("auto", "CPU kernels: auto (AMX tiles where granted, else the widest vectors), amx, "
                                    "avx512-vnni, avx512 or avx2")
    packed_cache: str | None = setting(
        "auto", "where a GGUF's k-quant layers are kept in the decode layout after a first load, so a restart maps "
        "them: auto ($LMK_HOME/packed), a directory, or off (None in Python)", cli=str)
    # A SpeculativeConfig, a dict of its fields, or "ngram" / a draft model; the CLI's --speculative-model and
    # --num-speculative-tokens.
    speculative: SpeculativeConfig | None = setting(None, "speculative decoding; off when unset", cli=None)
    # Every token runs as a row of the fused CPU decode step with the row kernels (slower prompts: BENCHMARKS.md).
    deterministic: bool = setting(False, "batch-invariant arithmetic: a request's tokens and log-probs do not depend "
                                         "on its batch, prompt chunking or the prefix cache (prompts ~4x slower: "
                                         "BENCHMARKS.md)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "speculative", speculative_config(self.speculative))
        if self.quantization == "dequantize":  # the `--quantization` spelling of None
            object.__setattr__(self, "quantization", None)
        if self.packed_cache == "off":  # the `--packed-cache` spelling of None
            object.__setattr__(self, "packed_cache", None)
        if self.prefill_tokens_with_decodes == 0:  # the `--prefill-tokens-with-decodes` spelling of None
            object.__setattr__(self, "prefill_tokens_with_decodes", None)
        if self.kv_cache_memory is not None and not isinstance(self.kv_cache_memory, bool):
            try:
                object.__setattr__(self, "kv_cache_memory", parse_bytes(self.kv_cache_memory))
            except ValueError as exc:
                raise EngineConfigError(f"--kv-cache-memory: {exc}") from None
        self._check()

    def flag(self, name: str) -> str:
        """The `lmk serve` flag of a setting."""
        return flag_of(self, name)

    def _check(self) -> None:
        def whole(v: object, low: int) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= low

        rules: list[tuple[str, bool, str]] = [
            ("dtype", self.dtype in DTYPES, "one of " + ", ".join(DTYPES)),
            ("device", isinstance(self.device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
             "auto, cpu, cuda or cuda:N"),
            ("quantization", self.quantization in QUANTIZATIONS, "auto, keep or dequantize (None)"),
            ("kv_cache_memory", self.kv_cache_memory is None or whole(self.kv_cache_memory, 1),
             "a positive size such as 512MiB"),
            ("kv_cache_fraction", isinstance(self.kv_cache_fraction, (int, float)) and 0 < self.kv_cache_fraction <= 1,
             "a fraction in (0, 1]"),
            ("block_size", whole(self.block_size, 1) and self.block_size & (self.block_size - 1) == 0,
             "a power of two (1, 2, 4, ... 16)"),
            ("enable_prefix_caching", isinstance(self.enable_prefix_caching, bool), "true or false"),
            ("deterministic", isinstance(self.deterministic, bool), "true or false"),
            ("hybrid_kv_cache", isinstance(self.hybrid_kv_cache, bool), "true or false"),
            ("max_num_seqs", whole(self.max_num_seqs, 1), "an integer >= 1"),
            ("max_num_batched_tokens", whole(self.max_num_batched_tokens, 1), "an integer >= 1"),
            ("prefill_tokens_with_decodes", self.prefill_tokens_with_decodes is None
             or whole(self.prefill_tokens_with_decodes, 1), "an integer >= 1 (or None: no cap)"),
            ("max_model_len", self.max_model_len is None or whole(self.max_model_len, 2), "an integer >= 2"),
            ("threads", self.threads is None or whole(self.threads, 1), "an integer >= 1"),
            ("seed", whole(self.seed, 0), "an integer >= 0"),
            ("max_loras", self.max_loras is None or whole(self.max_loras, 1), "an integer >= 1"),
            ("decode_backend", self.decode_backend in DECODE_BACKENDS, "one of " + ", ".join(DECODE_BACKENDS)),
            ("cpu_path", self.cpu_path in CPU_PATHS, "one of " + ", ".join(CPU_PATHS)),
            ("packed_cache", self.packed_cache is None or (isinstance(self.packed_cache, str) and self.packed_cache != ""),
             "auto, a directory, or None (off)"),
        ]
        for name, ok, expected in rules:
            if not ok:
                raise EngineConfigError(f"{self.flag(name)} (EngineConfig.{name}) must be {expected}; "
                                        f"got {getattr(self, name)!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise EngineConfigError(f"--max-num-batched-tokens ({self.max_num_batched_tokens}) must be at least "
                                    f"--max-num-seqs ({self.max_num_seqs}): each running sequence needs a token a step")

    @classmethod
    def build(cls, base: EngineConfig | None = None, **overrides: Any) -> EngineConfig:
        """`base` (or the defaults) with `overrides` applied; an unknown setting is named with the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise EngineConfigError(f"unknown engine setting {', '.join(map(repr, unknown))}; expected one of "
                                    f"{', '.join(sorted(known))}")
        return dataclasses.replace(base or cls(), **overrides)

    @property
    def cache(self) -> CacheConfig:
        return CacheConfig(self.block_size, self.kv_cache_memory, self.kv_cache_fraction, self.enable_prefix_caching,
                           self.hybrid_kv_cache)

    def scheduler(self, model: ModelConfig) -> SchedulerConfig:
        """The scheduler's limits for `model` (a request never reaches past the model's context)."""
        longest = model.max_context if self.max_model_len is None else min(self.max_model_len, model.max_context)
        return SchedulerConfig(self.max_num_batched_tokens, self.max_num_seqs, longest, self.prefill_tokens_with_decodes)
