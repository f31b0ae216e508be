"""What an OpenAI-compatible server is told besides its engine: names, keys, limits, logging."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmkernel.config.settings import flag_of, setting
from lmkernel.errors import LmkError


TOOL_CALL_PARSERS = ("hermes", "llama3_json")  # serve/tool_parsers: how tool calls are read from the output


class ServerConfigError(LmkError, ValueError):
    """A server setting out of range; the message names it as the `lmk serve` flag."""


@dataclass
class ServerConfig:
    """What an OpenAI-compatible server was told (`lmk serve`, `lmk batch`, each Ray replica): its names, keys,
    limits and logging; checked here, once, when it is made (every bad value named with its flag)."""

    model_name: str | None = setting(None, "the name clients use for the model", cli=None)
    embedding_model_name: str | None = setting(None, "the name clients use for the embedding model", cli=None)
    api_keys: list[str] = field(default_factory=list)
    max_body_bytes: int = setting(1 << 20, "larger request bodies get 413")
    max_queued_requests: int = setting(256, "completions and chats at once before 429")
    max_n: int = setting(16, "choices one request may ask for (n): each is a sequence in the engine")
    requests_per_minute: int | None = setting(None, "requests per minute per key", flag="--rate-limit-rpm")
    tokens_per_minute: int | None = setting(None, "prompt + max tokens per minute per key", flag="--rate-limit-tpm")
    request_timeout: float | None = setting(None, "seconds before a request is aborted")
    log_prompts: bool = setting(False, "log prompts and outputs, with personal data redacted")
    tool_call_parser: str | None = setting(None, "how tool calls are read from the output: hermes (Qwen2.5) or "
                                                 "llama3_json; default: chosen from the chat template")
    allow_runtime_lora: bool = setting(False, "POST /v1/load_lora_adapter and /v1/unload_lora_adapter (needs "
                                              "--api-key and --lora-modules-dir)")
    lora_modules_dirs: list[str] = field(default_factory=list)  # the directories runtime loads may read from

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_queued_requests", "max_n", "requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ServerConfigError(f"{flag_of(self, name)} must be at least 1; got {value}")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise ServerConfigError(f"--request-timeout must be positive; got {self.request_timeout}")
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ServerConfigError(f"--tool-call-parser must be one of {', '.join(TOOL_CALL_PARSERS)}; got '{self.tool_call_parser}'")
        if self.allow_runtime_lora and not self.api_keys:
            raise ServerConfigError("--allow-runtime-lora lets clients load adapter files from this machine: it needs --api-key "
                           "or --api-keys-file")
        if self.allow_runtime_lora and not self.lora_modules_dirs:
            raise ServerConfigError("--allow-runtime-lora needs --lora-modules-dir DIR: the directories clients may load "
                           "adapters from")
        if self.lora_modules_dirs and not self.allow_runtime_lora:
            raise ServerConfigError("--lora-modules-dir is for --allow-runtime-lora; add it, or leave the directory out")
