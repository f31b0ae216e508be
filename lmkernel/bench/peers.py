"""The peers lmkernel is measured against, loaded from the same files (dev dependencies)."""

from __future__ import annotations

import torch

from lmkernel.errors import LmkError
from lmkernel.registry import ModelSource


def load_hf_causal_lm(source: ModelSource, dtype: torch.dtype) -> torch.nn.Module:
    """Hugging Face transformers' model for the same GGUF file or directory, in eval mode."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise LmkError("the transformers peer is not installed: pip install -e '.[dev]'") from None
    if source.kind == "gguf":
        model = AutoModelForCausalLM.from_pretrained(source.path.parent, gguf_file=source.path.name, dtype=dtype)  # nosec B615  # a local directory or file: the hub is never reached (nothing downloads at run time)
    else:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)  # nosec B615  # a local directory or file: the hub is never reached (nothing downloads at run time)
    return model.eval()
