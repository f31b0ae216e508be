"""lmkernel: a runtime for transformer language models (load, run, compress, fine-tune, serve).

The names below load on first use (PEP 562), so `import lmkernel` and the `lmk` command line start
without importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_WHERE = {
    "LLM": "lmkernel.engine.llm",
    "EngineConfig": "lmkernel.config",
    "ClassificationOutput": "lmkernel.engine.llm",
    "CompletionOutput": "lmkernel.engine.request",
    "Logprob": "lmkernel.engine.request",
    "RequestOutput": "lmkernel.engine.request",
    "SamplingParams": "lmkernel.engine.sampling",
    "LmkError": "lmkernel.errors",
    "LoadedModel": "lmkernel.loading",
    "load_model": "lmkernel.loading",
}
__all__ = list(_WHERE)
__version__ = "0.1.0"

if TYPE_CHECKING:
    from lmkernel.config import EngineConfig
    from lmkernel.engine.llm import LLM, ClassificationOutput
    from lmkernel.engine.request import CompletionOutput, Logprob, RequestOutput
    from lmkernel.engine.sampling import SamplingParams
    from lmkernel.errors import LmkError
    from lmkernel.loading import LoadedModel, load_model


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'lmkernel' has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
