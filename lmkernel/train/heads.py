"""The heads a base model gets for a training task, initialised as transformers initialises them (normal, std
0.02; biases zero): BERT's masked-LM head, and a classifier for each architecture the classify task trains.

Each returns the new model (built on the meta device, loaded from the base's tensors and the head's), its
config, and the modules it created from scratch (a LoRA run trains those in full and saves them)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

import torch
from torch import nn

from lmkernel.config import ModelConfig
from lmkernel.models import model_class
from lmkernel.models.bert import CLASSIFIER_ARCHITECTURE, MLM_ARCHITECTURE
from lmkernel.models.weights import build_on_meta

INIT_STD = 0.02  # new heads start as Hugging Face initialises them (initializer_range)

Head = tuple[nn.Module, ModelConfig, list[str]]


def init_linear(layer: nn.Linear, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A new linear layer's weight and bias, seeded, as transformers initialises one."""
    weight = torch.empty(layer.out_features, layer.in_features).normal_(0.0, INIT_STD, generator=generator)
    return {"weight": weight, "bias": torch.zeros(layer.out_features)}


def mlm_head(model: nn.Module, config: ModelConfig, seed: int) -> Head:
    """A bare BERT with the masked-LM head (its output layer tied to the embeddings, its bias zero)."""
    created = ["cls.predictions.transform"]  # its output bias stays zero, as a fresh transformers head
    config = replace(config, hf_architecture=MLM_ARCHITECTURE, tie_word_embeddings=True)
    new = build_on_meta(model_class(config), config)
    g = torch.Generator().manual_seed(seed)
    transform = new.cls.predictions.transform
    head = {f"cls.predictions.transform.dense.{k}": v for k, v in init_linear(transform.dense, g).items()}
    head.update({"cls.predictions.transform.LayerNorm.weight": torch.ones(config.hidden_size),
                 "cls.predictions.transform.LayerNorm.bias": torch.zeros(config.hidden_size),
                 "cls.predictions.bias": torch.zeros(config.vocab_size)})
    new.load_weights({**model.state_dict(), **head}, f"{config.hf_architecture} head")
    return new, config, created


def bert_classifier_head(model: nn.Module, config: ModelConfig, id2label: dict[int, str], seed: int,
                         checkpoint: Callable[[], Mapping[str, torch.Tensor]]) -> Head:
    """BERT with a new classifier on its pooler; the pooler taken from the `checkpoint` tensors where they hold it
    (a bare encoder does not build one), else new."""
    created = ["classifier"]
    config = replace(config, hf_architecture=CLASSIFIER_ARCHITECTURE, id2label=id2label)
    new = build_on_meta(model_class(config), config)
    g = torch.Generator().manual_seed(seed)
    tensors = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    tensors.update({f"classifier.{k}": v for k, v in init_linear(new.classifier, g).items()})
    if model.bert.pooler is None:  # a bare encoder's checkpoint may still hold its pooler
        pooler = {f"bert.{k.removeprefix('bert.')}": v for k, v in checkpoint().items()
                  if k.removeprefix("bert.").startswith("pooler.dense.")}
        if len(pooler) < 2:
            pooler = {f"bert.pooler.dense.{k}": v for k, v in init_linear(new.bert.pooler.dense, g).items()}
            created.append("bert.pooler")
        tensors.update(pooler)
    new.load_weights(tensors, f"{config.hf_architecture} head")
    return new, config, created


def encoder_classifier_head(model: nn.Module, config: ModelConfig, id2label: dict[int, str], seed: int) -> Head:
    """transformers' head for the architecture, initialised as it does (normal, std 0.02; biases zero):
    MPNet's and nomic-bert's on the first token, Gemma3TextForSequenceClassification's `score` on the last."""
    classes = {"mpnet": "MPNetForSequenceClassification", "nomic_bert": "NomicBertForSequenceClassification",
               "gemma3": "Gemma3TextForSequenceClassification"}
    config = replace(config, id2label=id2label, hf_architecture=classes[config.architecture])
    new = build_on_meta(model_class(config), config)
    g = torch.Generator().manual_seed(seed)
    keep = {k: v for k, v in model.state_dict().items() if not k.startswith(("classifier.", "score.", "pooler."))}
    if config.architecture == "mpnet":
        created = ["classifier"]
        head = {f"classifier.{part}.{k}": v for part in ("dense", "out_proj")
                for k, v in init_linear(getattr(new.classifier, part), g).items()}
    elif config.architecture == "nomic_bert":  # a GGUF holds no pooler: it starts new, as the classifier does
        created = ["pooler", "classifier"]
        head = {f"{part}.{k}": v for part in ("pooler", "classifier") for k, v in init_linear(getattr(new, part), g).items()}
    else:
        created = ["score"]
        head = {"score.weight": torch.randn(len(id2label), config.hidden_size, generator=g) * INIT_STD}
    new.load_weights({**keep, **head}, f"{config.hf_architecture} head")
    return new, config, created


def decoder_classifier_head(model: nn.Module, config: ModelConfig, id2label: dict[int, str], seed: int) -> Head:
    """A decoder with a new `score` layer on its last token (transformers' ...ForSequenceClassification,
    initialised as transformers does: normal, std 0.02, no bias)."""
    family = {"qwen2": "Qwen2", "mistral": "Mistral"}.get(config.hf_model_type, "Llama")
    config = replace(config, hf_architecture=f"{family}ForSequenceClassification", id2label=id2label)
    new = build_on_meta(model_class(config), config)
    g = torch.Generator().manual_seed(seed)
    tensors = {k: v for k, v in model.state_dict().items() if not k.startswith("score.")}
    tensors["score.weight"] = torch.randn(len(id2label), config.hidden_size, generator=g) * 0.02
    new.load_weights(tensors, f"{config.hf_architecture} head")
    return new, config, ["score"]
