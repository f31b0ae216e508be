"""Put a loaded IA3, prompt- or prefix-tuning or bottleneck adapter onto a model: (IA)3 folds into the
weights, a bottleneck adapter wraps its layers (served as they are, no merge), prompt and prefix tuning
wrap the model.

The adapter is the loader's `PeftAdapter` (kind, config.targets / feedforward, modules: Hugging Face
module name -> tensors, prompt), taken by its fields so that models do not import the loader.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmkernel.config import ModelConfig
from lmkernel.errors import AdapterError
from lmkernel.layers.bottleneck import BottleneckLinear
from lmkernel.layers.ia3 import ia3_merged
from lmkernel.layers.lora import linear_layers
from lmkernel.models.virtual_tokens import PrefixTuned, PromptTuned


def apply_peft_adapter(model: nn.Module, config: ModelConfig, adapter: Any, hf_names: dict[str, str]) -> nn.Module:
    """The model with the adapter applied (the same object, or a `PromptTuned` around it). `hf_names`
    maps our module names to the adapter's (Hugging Face) names."""
    w = next(model.parameters())
    if adapter.kind == "PROMPT_TUNING":
        if adapter.prompt.shape[1] != config.hidden_size:
            raise AdapterError(f"{adapter.source}: 'prompt_embeddings' is {tuple(adapter.prompt.shape)}; this model's "
                               f"embeddings have width {config.hidden_size}")
        return PromptTuned(model, adapter.config.num_virtual_tokens, adapter.prompt.to(w.device, w.dtype))
    if adapter.kind == "PREFIX_TUNING":
        if config.architecture != "llama" or config.is_encoder:
            raise AdapterError(f"{adapter.source}: prefix tuning runs on Llama-family decoders here; this is a "
                               f"{config.architecture} model")
        want = config.num_layers * 2 * config.num_kv_heads * config.head_dim
        if adapter.prompt.shape[1] != want:
            raise AdapterError(f"{adapter.source}: 'prompt_embeddings' is {tuple(adapter.prompt.shape)}; this model's "
                               f"{config.num_layers} layers of keys and values need {want} columns")
        return PrefixTuned(model, adapter.config.num_virtual_tokens, adapter.prompt.to(w.device, w.dtype))
    layers = linear_layers(model)
    ours = {hf_names[n]: n for n in layers if n in hf_names}
    for module, parts in adapter.modules.items():
        name = ours.get(module)
        if name is None:
            raise AdapterError(f"{adapter.source}: tensors for module '{module}', which this {config.architecture} "
                               f"model ({config.hf_architecture}) has no linear layer for")
        base = layers[name]
        if adapter.kind == "IA3":
            ff = adapter.config.feedforward(module)
            want = (1, base.in_features) if ff else (base.out_features, 1)
            if tuple(parts["ia3_l"].shape) != want:
                raise AdapterError(f"{adapter.source}: '{module}.ia3_l' is {tuple(parts['ia3_l'].shape)}; the layer needs {want}")
            model.set_submodule(name, ia3_merged(base, parts["ia3_l"], ff, name))
            continue
        if parts["adapter_down.weight"].shape[1] != base.out_features:
            raise AdapterError(f"{adapter.source}: '{module}.adapter_down.weight' is {tuple(parts['adapter_down.weight'].shape)}; "
                               f"the layer has {base.out_features} outputs")
        wrapped = BottleneckLinear(base, adapter.config.adapter_size, adapter.config.activation)
        ref = next((t for t in base.parameters() if t.is_floating_point()), None)
        with torch.no_grad():
            for key, t in parts.items():
                target = wrapped.get_parameter(key)
                target.copy_(t.to(target.device, target.dtype))
        wrapped.requires_grad_(False)
        model.set_submodule(name, wrapped.to(ref.device) if ref is not None else wrapped)
    return model
