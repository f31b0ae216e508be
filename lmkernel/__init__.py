"""lmkernel: a runtime for transformer language models (load, run, compress, fine-tune, serve)."""

from lmkernel.errors import LmkError
from lmkernel.loading import LoadedModel, load_model

__all__ = ["LmkError", "LoadedModel", "load_model"]
__version__ = "0.1.0"
