"""`EngineConfig`: the one description of an engine, checked once, every bad value named with its flag."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lmkernel.config import EngineConfig, EngineConfigError, ModelConfig


@pytest.mark.parametrize(("setting", "value", "flag"), [
    ("max_num_seqs", 0, "--max-num-seqs"), ("max_num_batched_tokens", -1, "--max-num-batched-tokens"),
    ("block_size", 12, "--block-size"), ("kv_cache_memory", "lots", "--kv-cache-memory"),
    ("kv_cache_memory", 0, "--kv-cache-memory"), ("kv_cache_fraction", 1.5, "--kv-cache-fraction"),
    ("dtype", "fp8", "--dtype"), ("device", "tpu", "--device"), ("quantization", "int3", "--quantization"),
    ("max_model_len", 1, "--max-model-len"), ("threads", 0, "--threads"), ("seed", -1, "--seed"),
    ("max_loras", 0, "--max-loras"), ("decode_backend", "gpu", "--decode-backend"),
    ("enable_prefix_caching", "yes", "--enable-prefix-caching"), ("max_num_seqs", 2.5, "--max-num-seqs"),
    ("prefill_tokens_with_decodes", -1, "--prefill-tokens-with-decodes"), ("packed_cache", "", "--packed-cache"),
    ("packed_cache", 3, "--packed-cache"),
])
def test_every_bad_value_is_named_with_its_flag(setting, value, flag):
    with pytest.raises(EngineConfigError) as err:
        EngineConfig(**{setting: value})
    assert str(err.value).startswith(flag)
    assert isinstance(err.value, ValueError)


def test_sizes_parse_and_limits_agree():
    c = EngineConfig(kv_cache_memory="64MiB", max_num_seqs=8, max_num_batched_tokens=256, block_size=8)
    assert c.kv_cache_memory == 64 << 20 and c.cache.memory_bytes == 64 << 20 and c.cache.block_size == 8
    with pytest.raises(EngineConfigError, match="--max-num-batched-tokens .* at least --max-num-seqs"):
        EngineConfig(max_num_seqs=64, max_num_batched_tokens=32)
    with pytest.raises(AttributeError):
        c.max_num_seqs = 3  # frozen: passed down whole, changed only by building another
    capped = EngineConfig(prefill_tokens_with_decodes=128)
    assert capped.scheduler(SimpleNamespace(max_context=4096)).prefill_tokens_with_decodes == 128
    assert EngineConfig().scheduler(SimpleNamespace(max_context=4096)).prefill_tokens_with_decodes is None  # offline: the whole budget
    assert EngineConfig(prefill_tokens_with_decodes=0).prefill_tokens_with_decodes is None  # the CLI spelling of no cap


def test_packed_cache_is_auto_a_directory_or_off():
    assert EngineConfig().packed_cache == "auto"
    assert EngineConfig(packed_cache="off").packed_cache is None
    assert EngineConfig(packed_cache="/tmp/packed").packed_cache == "/tmp/packed"


def test_build_applies_overrides_and_names_unknown_settings():
    base = EngineConfig(max_num_seqs=8, max_num_batched_tokens=64)
    assert EngineConfig.build(base, seed=3) == EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, seed=3)
    with pytest.raises(EngineConfigError, match="unknown engine setting 'max_num_seq'; expected one of .*max_num_seqs"):
        EngineConfig.build(base, max_num_seq=4)


def test_scheduler_limits_never_pass_the_models_context():
    model = ModelConfig("llama", 100, 8, 16, 1, 2, 1, 4, max_position_embeddings=512, sliding_window=256)
    assert EngineConfig().scheduler(model).max_model_len == 512  # a sliding window does not bound the context
    assert EngineConfig(max_model_len=128).scheduler(model).max_model_len == 128
    assert EngineConfig(max_model_len=4096).scheduler(model).max_model_len == 512


@pytest.mark.parametrize(("args", "flag"), [
    (["--block-size", "12"], "--block-size"), (["--max-num-seqs", "0"], "--max-num-seqs"),
    (["--kv-cache-memory", "much"], "--kv-cache-memory"), (["--decode-backend", "gpu"], "--decode-backend"),
    (["--threads", "0"], "--threads"), (["--max-model-len", "1"], "--max-model-len"),
    (["--packed-cache", ""], "--packed-cache"),
])
def test_lmk_serve_flags_build_the_same_record(args, flag):
    """`lmk serve` refuses a bad engine flag before loading anything, with EngineConfig's own message."""
    from typer.testing import CliRunner

    from lmkernel.cli import app

    result = CliRunner().invoke(app, ["serve", "smollm2-135m-instruct", *args])
    assert result.exit_code != 0 and f"error: {flag}" in result.output
