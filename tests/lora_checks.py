"""Helpers of the LoRA tests: random adapters written straight to disk, transformers references built
from our weights without a second load, and a BERT classifier made from all-MiniLM-L6-v2."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from lmkernel.config import ModelConfig
from lmkernel.layers.lora import LoraLinear, init_lora_a
from lmkernel.loader.adapter import AdapterConfig, LoraAdapter, write_adapter
from lmkernel.loader.hf_config import parse_config
from lmkernel.loader.hf_dir import load_tensors
from lmkernel.models import model_class
from lmkernel.models.weights import build_on_meta

LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def llama_linear_shapes(config: ModelConfig, layer: int) -> dict[str, tuple[int, int]]:
    """(in, out) of the attention and MLP projections of one Llama layer, by Hugging Face module name."""
    h, kv, inter = config.hidden_size, config.num_kv_heads * config.head_dim, config.intermediate_size
    shapes = {"self_attn.q_proj": (h, config.num_heads * config.head_dim), "self_attn.k_proj": (h, kv),
              "self_attn.v_proj": (h, kv), "self_attn.o_proj": (config.num_heads * config.head_dim, h),
              "mlp.gate_proj": (h, inter), "mlp.up_proj": (h, inter), "mlp.down_proj": (inter, h)}
    return {f"model.layers.{layer}.{k}": v for k, v in shapes.items()}


def random_llama_adapter(directory: Path, config: ModelConfig, seed: int, targets: tuple[str, ...] = ("q_proj", "v_proj"),
                         r: int = 4, alpha: float = 8.0, scale: float = 0.2, base: str = "smollm2-135m-instruct") -> Path:
    """A LoRA adapter with random A and B on every layer's `targets`, written in the PEFT format. At
    scale 0.2 it changes a fifth of SmolLM2's greedy next tokens on WikiText and barely its loss."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for i in range(config.num_layers):
        for name, (fan_in, fan_out) in llama_linear_shapes(config, i).items():
            if name.rsplit(".", 1)[-1] in targets:
                lora[name] = (init_lora_a(r, fan_in, g), torch.randn(fan_out, r, generator=g) * scale)
    cfg = AdapterConfig(r=r, lora_alpha=alpha, target_modules=targets, task_type="CAUSAL_LM", base_model_name_or_path=base)
    return write_adapter(directory, LoraAdapter(cfg, lora, {}, "LlamaForCausalLM"))


def randomize_lora(model: nn.Module, seed: int, scale: float) -> None:
    """Give every LoraLinear a random B (A is random from its start), so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * scale)


def minilm_classifier(minilm_dir: Path, seed: int) -> nn.Module:
    """all-MiniLM-L6-v2 as a BertForSequenceClassification (three labels): its pooler from the file, a seeded classifier."""
    config = replace(parse_config(minilm_dir), hf_architecture="BertForSequenceClassification", id2label=dict(LABELS))
    model = build_on_meta(model_class(config), config)
    g = torch.Generator().manual_seed(seed)
    tensors = load_tensors(minilm_dir, torch.float32)
    tensors["classifier.weight"] = torch.randn(len(LABELS), config.hidden_size, generator=g) * 0.05
    tensors["classifier.bias"] = torch.randn(len(LABELS), generator=g) * 0.05
    model.load_weights(tensors, str(minilm_dir))
    return model.eval()


def hf_llama(loaded_model: nn.Module, config: ModelConfig):
    """transformers' LlamaForCausalLM holding our model's weights (shared, not copied), eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from lmkernel.loader.hf_export import hf_config

    hf_cfg = LlamaConfig(**hf_config(config, torch.float32))
    with torch.device("meta"):
        hf = LlamaForCausalLM(hf_cfg)
    state = dict(loaded_model.state_dict())
    state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    hf.load_state_dict(state, strict=True, assign=True)
    hf.model.rotary_emb = LlamaRotaryEmbedding(config=hf_cfg)  # its buffers are computed, not loaded
    return hf.eval()


def classify_logits(model: nn.Module, seqs: list[list[int]]) -> torch.Tensor:
    """Our classifier's logits for token sequences, as one unpadded batch."""
    from model_checks import flatten

    ids, positions, meta = flatten(seqs, causal=False)
    with torch.no_grad():
        return model.classify(model(ids, positions, meta), meta)


def hf_classify_logits(model: nn.Module, seqs: list[list[int]]) -> torch.Tensor:
    """A transformers (or peft) classifier's logits for the same sequences, right-padded with a mask."""
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits
