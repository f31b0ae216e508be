"""`load_model`: a name or path in, a ready model with its config and tokenizer out.

This is the reference path: one sequence (or a batch of sentences) through plain attention. The
engine is checked against it, and users call it to score text or embed sentences.
"""

from lmkernel.loading.load import describe, load_model, resolve_device, resolve_dtype
from lmkernel.loading.loaded_model import LoadedModel, truncate_embeddings

__all__ = ["LoadedModel", "describe", "load_model", "resolve_device", "resolve_dtype", "truncate_embeddings"]
