"""The configuration records every layer is handed: the model's (filled by the loaders, read by the models),
the engine's and the server's (made by the CLI and the Python API, checked once when made)."""

from lmkernel.config.engine import (CPU_PATHS, DECODE_BACKENDS, DTYPES, QUANTIZATIONS, SPECULATIVE_FLAGS, CacheConfig,
                                    EngineConfig, EngineConfigError, SchedulerConfig, SpeculativeConfig, parse_bytes,
                                    speculative_config)
from lmkernel.config.model import ENCODER_ARCHITECTURES, ModelConfig
from lmkernel.config.server import TOOL_CALL_PARSERS, ServerConfig, ServerConfigError
from lmkernel.config.settings import flag_of, setting

__all__ = ["CPU_PATHS", "DECODE_BACKENDS", "DTYPES", "ENCODER_ARCHITECTURES", "QUANTIZATIONS", "SPECULATIVE_FLAGS",
           "TOOL_CALL_PARSERS", "CacheConfig", "EngineConfig", "EngineConfigError", "ModelConfig", "SchedulerConfig",
           "ServerConfig", "ServerConfigError", "SpeculativeConfig", "flag_of", "parse_bytes", "setting",
           "speculative_config"]
