"""lmkernel: a runtime for transformer language models (load, run, compress, fine-tune, serve)."""

from lmkernel.engine.llm import LLM, ClassificationOutput
from lmkernel.engine.request import CompletionOutput, Logprob, RequestOutput
from lmkernel.engine.sampling import SamplingParams
from lmkernel.errors import LmkError
from lmkernel.loading import LoadedModel, load_model

__all__ = [
    "LLM",
    "ClassificationOutput",
    "CompletionOutput",
    "LmkError",
    "LoadedModel",
    "Logprob",
    "RequestOutput",
    "SamplingParams",
    "load_model",
]
__version__ = "0.1.0"
