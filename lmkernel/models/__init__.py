"""One file per architecture; `model_class` picks the class for a `ModelConfig`."""

from __future__ import annotations

from torch import nn

from lmkernel.config import ModelConfig
from lmkernel.errors import UnsupportedModelError
from lmkernel.models.bert import BertModel
from lmkernel.models.gpt2 import GPT2LMHeadModel
from lmkernel.models.llama import LlamaForCausalLM

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "gpt2": GPT2LMHeadModel,
    "bert": BertModel,
}


def model_class(config: ModelConfig) -> type[nn.Module]:
    """The model class for `config.architecture`, or a clear error."""
    try:
        return MODEL_CLASSES[config.architecture]
    except KeyError:
        raise UnsupportedModelError(
            f"architecture '{config.architecture}' is not supported; expected one of {sorted(MODEL_CLASSES)}"
        ) from None
