"""Engine and server options are declared once, in the config dataclasses, and every command that runs an engine
takes the same ones: the values reach the config the command is handed, bad ones are the config's own error line."""

from __future__ import annotations

import dataclasses

import pytest
import typer
from typer.testing import CliRunner

from lmkernel.cli import app
from lmkernel.cli.options import config_options
from lmkernel.config import EngineConfig, ServerConfig

ENGINE_FLAGS = sorted({"--" + f.name.replace("_", "-") for f in dataclasses.fields(EngineConfig)
                       if "help" in f.metadata and f.name != "speculative"} | {"--speculative-model",
                                                                                "--num-speculative-tokens"})


def _help(*command: str) -> str:
    out = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "300"}, terminal_width=300)
    assert out.exit_code == 0, out.output
    return out.output


@pytest.mark.parametrize("command", [("serve",), ("batch",), ("generate",), ("chat",)])
def test_every_command_that_runs_an_engine_takes_every_engine_setting(command):
    text = _help(*command)
    missing = [flag for flag in ENGINE_FLAGS if f" {flag} " not in text]
    assert not missing, missing
    # The help is the field's own, word for word.
    assert EngineConfig.__dataclass_fields__["block_size"].metadata["help"] in text


def test_serve_takes_the_server_settings_under_their_flags():
    text = _help("serve")
    for flag in ("--max-body-bytes", "--max-queued-requests", "--max-n", "--rate-limit-rpm", "--rate-limit-tpm",
                 "--request-timeout", "--log-prompts", "--tool-call-parser", "--allow-runtime-lora"):
        assert f" {flag} " in text, flag


def _probe(**defaults):
    """A command made with config_options that reports the EngineConfig and server values it was handed."""
    seen = {}
    probe = typer.Typer()

    @probe.command()
    @config_options(ServerConfig, "server", build=dict)
    @config_options(EngineConfig, "engine", defaults=defaults)
    def run(engine: EngineConfig, server: dict, name: str = "x") -> None:
        seen.update(engine=engine, server=server, name=name)

    return probe, seen


def test_values_reach_the_config_and_the_command_keeps_its_own_parameters():
    probe, seen = _probe(prefill_tokens_with_decodes=512)
    out = CliRunner().invoke(probe, ["--name", "y", "--block-size", "32", "--kv-cache-memory", "1MiB", "--no-enable-prefix-caching",
                                     "--deterministic", "--speculative-model", "ngram", "--num-speculative-tokens", "2",
                                     "--rate-limit-rpm", "7", "--max-n", "3"])
    assert out.exit_code == 0, out.output
    engine = seen["engine"]
    assert (engine.block_size, engine.kv_cache_memory, engine.enable_prefix_caching, engine.deterministic) == \
        (32, 1 << 20, False, True)
    assert engine.speculative.model == "ngram" and engine.speculative.num_speculative_tokens == 2
    assert engine.prefill_tokens_with_decodes == 512  # this command's default, not the dataclass's None
    assert seen["server"]["requests_per_minute"] == 7 and seen["server"]["max_n"] == 3 and seen["name"] == "y"
    CliRunner().invoke(probe, ["--prefill-tokens-with-decodes", "0"])
    assert seen["engine"].prefill_tokens_with_decodes is None  # 0: no cap


def test_a_bad_value_is_the_configs_own_error_line():
    probe, seen = _probe()
    out = CliRunner().invoke(probe, ["--block-size", "24"])
    assert out.exit_code == 1 and not seen
    assert "--block-size (EngineConfig.block_size) must be a power of two" in out.output
    assert "Traceback" not in out.output


def test_server_settings_are_checked_when_the_config_is_made():
    with pytest.raises(ValueError, match="--rate-limit-tpm must be at least 1; got 0"):
        ServerConfig(tokens_per_minute=0)
    with pytest.raises(ValueError, match="--tool-call-parser must be one of hermes, llama3_json; got 'x'"):
        ServerConfig(tool_call_parser="x")
    with pytest.raises(ValueError, match="needs --api-key"):
        ServerConfig(allow_runtime_lora=True, lora_modules_dirs=["/tmp"])
    with pytest.raises(ValueError, match="needs --lora-modules-dir"):
        ServerConfig(allow_runtime_lora=True, api_keys=["k"])
    assert ServerConfig(allow_runtime_lora=True, api_keys=["k"], lora_modules_dirs=["/tmp"]).max_n == 16


def test_bench_commands_take_their_engine_settings_from_the_same_declarations():
    fields = EngineConfig.__dataclass_fields__
    for command, names in ((("bench", "throughput"), ("max_num_seqs", "max_num_batched_tokens", "dtype", "device")),
                           (("bench", "latency"), ("cpu_path", "quantization"))):
        text = " ".join(_help(*command).split())
        for name in names:
            assert fields[name].metadata["help"] in text, (command, name)


def test_an_option_for_a_setting_that_does_not_exist_is_named():
    from lmkernel.cli.options import option

    with pytest.raises(ValueError, match="^EngineConfig has no setting 'gpus'$"):
        option(EngineConfig, "gpus")
