"""One file per architecture; `model_class` picks the class for a `ModelConfig`."""

from __future__ import annotations

from torch import nn

from lmkernel.config import ModelConfig
from lmkernel.errors import UnsupportedModelError
from lmkernel.models.bert import BertModel
from lmkernel.models.gemma3 import Gemma3Encoder, Gemma3ForCausalLM
from lmkernel.models.gpt2 import GPT2LMHeadModel
from lmkernel.models.llama import LlamaForCausalLM
from lmkernel.models.mpnet import MPNetModel
from lmkernel.models.nomic_bert import NomicBertModel

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "gemma3": Gemma3ForCausalLM,
    "gemma3_encoder": Gemma3Encoder,  # EmbeddingGemma: `bidirectional`
    "gpt2": GPT2LMHeadModel,
    "bert": BertModel,
    "mpnet": MPNetModel,
    "nomic_bert": NomicBertModel,
}


def model_class(config: ModelConfig) -> type[nn.Module]:
    """The model class for `config.architecture`, or a clear error."""
    try:
        return MODEL_CLASSES[f"{config.architecture}_encoder" if config.bidirectional else config.architecture]
    except KeyError:
        raise UnsupportedModelError(
            f"architecture '{config.architecture}' is not supported; expected one of {sorted(MODEL_CLASSES)}"
        ) from None
