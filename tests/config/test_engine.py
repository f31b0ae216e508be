"""What tests/test_config.py leaves out of EngineConfig: byte units, speculative decoding's forms and errors, the
cache and scheduler records it hands down, and the CLI spellings of None."""

from __future__ import annotations

import pytest

from lmkernel.config import (CPU_PATHS, SPECULATIVE_FLAGS, CacheConfig, EngineConfig, EngineConfigError, ModelConfig,
                             SchedulerConfig, SpeculativeConfig, parse_bytes, speculative_config)

MODEL = ModelConfig("llama", 100, 8, 16, 1, 2, 1, 4, max_position_embeddings=1024)


@pytest.mark.parametrize(("text", "expected"), [
    ("100", 100), ("100B", 100), ("3K", 3000), ("3kb", 3000), ("3KiB", 3 * 1024), ("2M", 2_000_000),
    ("2MiB", 2 * 2**20), ("1GB", 10**9), ("1gib", 2**30), ("2T", 2 * 10**12), ("2TB", 2 * 10**12),
    ("1TiB", 2**40), (".5GiB", 2**29), ("0.25 MiB", 2**18), ("1.9", 1), (1536.7, 1536),
])
def test_parse_bytes_units(text: str | float, expected: int) -> None:
    got = parse_bytes(text)
    assert got == expected and type(got) is int


@pytest.mark.parametrize("bad", ["1PB", "GiB", "1e9", "1,000", "1 G B", "", True, -0.5, "0", "0GiB", "0.1"])
def test_parse_bytes_refuses_what_is_not_a_size(bad: object) -> None:
    with pytest.raises(ValueError, match="kv_cache_memory must") as err:
        parse_bytes(bad)
    if isinstance(bad, str):
        assert str(err.value).endswith(f"got {bad!r}")


def test_kv_cache_memory_errors_carry_the_flag_and_the_parse_error() -> None:
    with pytest.raises(EngineConfigError) as err:
        EngineConfig(kv_cache_memory="3 bananas")
    assert str(err.value) == ("--kv-cache-memory: kv_cache_memory must look like '2GiB', '512MB' or a byte count; "
                              "got '3 bananas'")
    with pytest.raises(EngineConfigError, match=r"^--kv-cache-memory \(EngineConfig.kv_cache_memory\) must be a "
                                                r"positive size such as 512MiB; got True$"):
        EngineConfig(kv_cache_memory=True)


def test_speculative_config_forms() -> None:
    assert speculative_config(None) is None
    spec = SpeculativeConfig("ngram", 5)
    assert speculative_config(spec) is spec
    assert speculative_config("draft-model") == SpeculativeConfig("draft-model", 3, 2, 4, 4)
    assert speculative_config({"model": "ngram", "prompt_lookup_min": 1, "prompt_lookup_max": 1,
                               "disable_by_batch_size": 4096}) == SpeculativeConfig("ngram", 3, 1, 1, 4096)
    assert EngineConfig(speculative={"model": "d", "num_speculative_tokens": 15}).speculative == SpeculativeConfig("d", 15)


def test_speculative_describe_and_is_ngram() -> None:
    assert SpeculativeConfig("ngram", 4).describe() == "ngram x4" and SpeculativeConfig("ngram").is_ngram
    assert SpeculativeConfig("./draft").describe() == "./draft x3" and not SpeculativeConfig("./draft").is_ngram


@pytest.mark.parametrize(("value", "message"), [
    (3, "speculative must be None, a SpeculativeConfig, a dict of its fields or a model name; got 3"),
    (["ngram"], "speculative must be None, a SpeculativeConfig, a dict of its fields or a model name; got ['ngram']"),
    ({"model": "ngram", "k": 1, "draft": 2}, "speculative: unknown setting 'draft', 'k'; expected model, "
     "num_speculative_tokens, prompt_lookup_min, prompt_lookup_max, disable_by_batch_size"),
    ("", "--speculative-model (SpeculativeConfig.model) must be \"ngram\" or a draft model's alias or path; got ''"),
    ({"model": "ngram", "num_speculative_tokens": 16},
     "--num-speculative-tokens (SpeculativeConfig.num_speculative_tokens) must be an integer in 1..15; got 16"),
    ({"model": "ngram", "num_speculative_tokens": True},
     "--num-speculative-tokens (SpeculativeConfig.num_speculative_tokens) must be an integer in 1..15; got True"),
    ({"model": "ngram", "prompt_lookup_min": 0},
     "--prompt-lookup-min (SpeculativeConfig.prompt_lookup_min) must be an integer in 1..64; got 0"),
    ({"model": "ngram", "prompt_lookup_min": 2, "prompt_lookup_max": 65},
     "--prompt-lookup-max (SpeculativeConfig.prompt_lookup_max) must be an integer in 1..64, at least "
     "--prompt-lookup-min (2); got 65"),
    ({"model": "ngram", "disable_by_batch_size": 0},
     "--speculative-disable-by-batch-size (SpeculativeConfig.disable_by_batch_size) must be an integer >= 1; got 0"),
    (SpeculativeConfig("ngram", 2.0),  # type: ignore[arg-type]
     "--num-speculative-tokens (SpeculativeConfig.num_speculative_tokens) must be an integer in 1..15; got 2.0"),
])
def test_speculative_config_errors_name_the_flag(value: object, message: str) -> None:
    with pytest.raises(EngineConfigError) as err:
        speculative_config(value)  # type: ignore[arg-type]
    assert str(err.value) == message


def test_speculative_flags_cover_every_field() -> None:
    import dataclasses

    assert set(SPECULATIVE_FLAGS) == {f.name for f in dataclasses.fields(SpeculativeConfig)}


def test_cache_record_carries_the_cache_settings() -> None:
    config = EngineConfig(block_size=32, kv_cache_memory="1MiB", kv_cache_fraction=0.5, enable_prefix_caching=False,
                          hybrid_kv_cache=False)
    assert config.cache == CacheConfig(block_size=32, memory_bytes=2**20, memory_fraction=0.5,
                                       enable_prefix_caching=False, hybrid=False)
    assert EngineConfig().cache == CacheConfig()  # the defaults agree


def test_scheduler_record_carries_the_limits() -> None:
    config = EngineConfig(max_num_seqs=4, max_num_batched_tokens=4, prefill_tokens_with_decodes=2, max_model_len=2)
    assert config.scheduler(MODEL) == SchedulerConfig(max_num_batched_tokens=4, max_num_seqs=4, max_model_len=2,
                                                      prefill_tokens_with_decodes=2)
    assert EngineConfig().scheduler(MODEL) == SchedulerConfig(2048, 64, 1024, None)


@pytest.mark.parametrize(("seqs", "tokens", "ok"), [(8, 8, True), (8, 7, False), (1, 1, True)])
def test_batched_tokens_must_cover_one_token_per_sequence(seqs: int, tokens: int, ok: bool) -> None:
    if ok:
        assert EngineConfig(max_num_seqs=seqs, max_num_batched_tokens=tokens).max_num_seqs == seqs
    else:
        with pytest.raises(EngineConfigError) as err:
            EngineConfig(max_num_seqs=seqs, max_num_batched_tokens=tokens)
        assert str(err.value) == (f"--max-num-batched-tokens ({tokens}) must be at least --max-num-seqs ({seqs}): each "
                                  "running sequence needs a token a step")


def test_cli_spellings_of_none() -> None:
    assert EngineConfig(quantization="dequantize").quantization is None
    assert EngineConfig(quantization=None).quantization is None
    assert EngineConfig(quantization="keep").quantization == "keep"


@pytest.mark.parametrize(("setting", "good", "bad", "expected"), [
    ("device", ["cuda:1", "cuda", "cpu", "auto"], ["cuda:", "cuda:x", "gpu", 0], "auto, cpu, cuda or cuda:N"),
    ("cpu_path", list(CPU_PATHS), ["sse", "AMX"], "one of auto, amx, avx512-vnni, avx512, avx2"),
    ("hybrid_kv_cache", [True, False], [1, "false"], "true or false"),
    ("deterministic", [True, False], [0, None], "true or false"),
    ("block_size", [1, 2, 64], [0, 3, 48, True], "a power of two (1, 2, 4, ... 16)"),
    ("kv_cache_fraction", [1, 0.01, 1.0], [0, -0.1, "0.5"], "a fraction in (0, 1]"),
    ("seed", [0, 12345], [1.0, False], "an integer >= 0"),
])
def test_settings_not_covered_elsewhere(setting: str, good: list, bad: list, expected: str) -> None:
    for value in good:
        assert getattr(EngineConfig(**{setting: value}), setting) == value
    for value in bad:
        with pytest.raises(EngineConfigError) as err:
            EngineConfig(**{setting: value})
        flag = "--" + setting.replace("_", "-")
        assert str(err.value) == f"{flag} (EngineConfig.{setting}) must be {expected}; got {value!r}"


def test_build_without_a_base_starts_from_the_defaults_and_rechecks() -> None:
    assert EngineConfig.build(seed=5) == EngineConfig(seed=5)
    with pytest.raises(EngineConfigError, match=r"^--seed \(EngineConfig.seed\)"):
        EngineConfig.build(EngineConfig(), seed=-2)
    with pytest.raises(EngineConfigError, match=r"unknown engine setting 'a', 'b'; expected one of block_size, "):
        EngineConfig.build(b=1, a=2)
