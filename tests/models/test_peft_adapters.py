"""models/peft_adapters.py: an (IA)3, prompt- or prefix-tuning adapter put on our Llama gives peft's logits on
transformers' (tiny_llama, the same adapter weights); a bottleneck adapter gives its equation as hooks on transformers'
layers; adapters that do not fit are refused naming the tensor and what the model needs."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from model_checks import flatten, load_dir

from lmkernel.errors import AdapterError
from lmkernel.layers.bottleneck import BottleneckLinear
from lmkernel.layers.lora import linear_layers
from lmkernel.loader.peft_kinds import PeftAdapter, PeftFields
from lmkernel.models.peft_adapters import apply_peft_adapter
from lmkernel.models.virtual_tokens import PrefixTuned, PromptTuned

SEQS = [[5, 90, 17, 200, 33, 8, 140], [60, 7, 251]]
WHERE = Path("/adapters/a")
SOURCE = "/adapters/a/adapter_model.safetensors"


@pytest.fixture(scope="module")
def base(tiny_llama, tmp_path_factory):
    """Our Llama holding tiny_llama's weights (each test applies its adapter to a copy)."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama.save_pretrained(directory, safe_serialization=True)
    return load_dir(directory)


def _apply(base, adapter: PeftAdapter):
    model = copy.deepcopy(base)
    return model, apply_peft_adapter(model, model.config, adapter, {n: n for n in linear_layers(model)})


def _ours(model) -> list[torch.Tensor]:
    ids, positions, meta = flatten(SEQS, causal=True)
    with torch.inference_mode():
        logits = model.compute_logits(model(ids, positions, meta))
    return list(logits.split([len(s) for s in SEQS]))


def _theirs(model, skip: int = 0) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [model(input_ids=torch.tensor([s])).logits[0, skip:] for s in SEQS]


def _peft(tiny_llama, config, seed: int):
    """tiny_llama (a copy) under peft, every adapter tensor drawn at random, and its tensors by name."""
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict

    model = get_peft_model(copy.deepcopy(tiny_llama), config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_((1 if "ia3_l" in name else 0) + torch.randn(p.shape, generator=g) * 0.5)
    return model, get_peft_model_state_dict(model)


def _close(ours: list[torch.Tensor], theirs: list[torch.Tensor], base_logits: list[torch.Tensor]) -> None:
    for a, b, plain in zip(ours, theirs, base_logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert (a - plain).abs().max() > 0.05  # the adapter changed them


def test_ia3_folds_into_the_weights_with_peft_s_logits(base, tiny_llama):
    from peft import IA3Config

    config = IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                       feedforward_modules=["down_proj"])
    reference, tensors = _peft(tiny_llama, config, seed=1)
    prefix = "base_model.model."
    modules = {k[len(prefix):].removesuffix(".ia3_l"): {"ia3_l": t} for k, t in tensors.items()}
    assert len(modules) == 6 and modules["model.layers.1.mlp.down_proj"]["ia3_l"].shape == (1, 512)
    fields = PeftFields(task_type="CAUSAL_LM", target_modules=("k_proj", "v_proj", "down_proj"),
                        feedforward_modules=("down_proj",))
    model, applied = _apply(base, PeftAdapter("IA3", fields, modules))
    assert applied is model and not any(isinstance(m, BottleneckLinear) for m in applied.modules())
    _close(_ours(applied), _theirs(reference), _ours(base))


def test_prompt_tuning_wraps_the_model_with_peft_s_logits(base, tiny_llama):
    from peft import PromptTuningConfig

    reference, tensors = _peft(tiny_llama, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), seed=2)
    prompt = tensors["prompt_embeddings"]
    assert prompt.shape == (3, 256)
    _, applied = _apply(base, PeftAdapter("PROMPT_TUNING", PeftFields(num_virtual_tokens=3), prompt=prompt))
    assert isinstance(applied, PromptTuned) and torch.equal(applied.prompt_embeddings, prompt)
    _close(_ours(applied), _theirs(reference, skip=3), _ours(base))


def test_prefix_tuning_wraps_the_model_with_peft_s_logits(base, tiny_llama):
    from peft import PrefixTuningConfig

    reference, tensors = _peft(tiny_llama, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), seed=3)
    prompt = tensors["prompt_embeddings"]
    assert prompt.shape == (3, 2 * 2 * 2 * 64)  # layers * (keys, values) * kv heads * head_dim
    _, applied = _apply(base, PeftAdapter("PREFIX_TUNING", PeftFields(num_virtual_tokens=3), prompt=prompt))
    assert isinstance(applied, PrefixTuned)
    _close(_ours(applied), _theirs(reference), _ours(base))


def test_bottleneck_wraps_its_layers_as_y_plus_up_act_down_y(base, tiny_llama):
    g = torch.Generator().manual_seed(4)
    targets = ["model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"]
    modules = {name: {"adapter_down.weight": torch.randn(8, 256, generator=g) * 0.3,
                      "adapter_down.bias": torch.randn(8, generator=g),
                      "adapter_up.weight": torch.randn(256, 8, generator=g) * 0.3,
                      "adapter_up.bias": torch.randn(256, generator=g)} for name in targets}
    fields = PeftFields(target_modules=("o_proj", "down_proj"), adapter_size=8, activation="silu")
    model, applied = _apply(base, PeftAdapter("BOTTLENECK", fields, modules))
    assert applied is model
    assert [n for n, m in applied.named_modules() if isinstance(m, BottleneckLinear)] == targets
    assert not any(p.requires_grad for n, p in applied.named_parameters() if "adapter_" in n)

    def hook(parts):
        return lambda _m, _a, y: y + F.linear(F.silu(F.linear(y, parts["adapter_down.weight"], parts["adapter_down.bias"])),
                                              parts["adapter_up.weight"], parts["adapter_up.bias"])

    handles = [tiny_llama.get_submodule(n).register_forward_hook(hook(modules[n])) for n in targets]
    try:
        expected = _theirs(tiny_llama)
    finally:
        for h in handles:
            h.remove()
    _close(_ours(applied), expected, _ours(base))


def _refused(base, adapter: PeftAdapter, config_changes: dict | None = None) -> str:
    model = copy.deepcopy(base)
    config = dataclasses.replace(model.config, **(config_changes or {}))
    with pytest.raises(AdapterError) as err:
        apply_peft_adapter(model, config, adapter, {n: n for n in linear_layers(model)})
    return str(err.value)


def test_adapters_that_do_not_fit_are_refused_naming_tensor_and_need(base):
    prompt = PeftFields(num_virtual_tokens=2)
    assert _refused(base, PeftAdapter("PROMPT_TUNING", prompt, prompt=torch.zeros(2, 100), path=WHERE)) == (
        f"{SOURCE}: 'prompt_embeddings' is (2, 100); this model's embeddings have width 256")
    assert _refused(base, PeftAdapter("PREFIX_TUNING", prompt, prompt=torch.zeros(2, 256), path=WHERE)) == (
        f"{SOURCE}: 'prompt_embeddings' is (2, 256); this model's 2 layers of keys and values need 512 columns")
    assert _refused(base, PeftAdapter("PREFIX_TUNING", prompt, prompt=torch.zeros(2, 512), path=WHERE),
                    {"architecture": "gpt2"}) == (
        f"{SOURCE}: prefix tuning runs on Llama-family decoders here; this is a gpt2 model")
    ia3 = PeftFields(target_modules=("k_proj", "nope"), feedforward_modules=())
    assert _refused(base, PeftAdapter("IA3", ia3, {"model.layers.0.mlp.nope": {"ia3_l": torch.ones(1, 1)}}, path=WHERE)) == (
        f"{SOURCE}: tensors for module 'model.layers.0.mlp.nope', which this llama model (LlamaForCausalLM) has no "
        "linear layer for")
    assert _refused(base, PeftAdapter("IA3", ia3, {"model.layers.0.self_attn.k_proj": {"ia3_l": torch.ones(1, 256)}},
                                      path=WHERE)) == (
        f"{SOURCE}: 'model.layers.0.self_attn.k_proj.ia3_l' is (1, 256); the layer needs (128, 1)")
    parts = {"adapter_down.weight": torch.zeros(4, 128), "adapter_down.bias": torch.zeros(4),
             "adapter_up.weight": torch.zeros(128, 4), "adapter_up.bias": torch.zeros(128)}
    bottleneck = PeftAdapter("BOTTLENECK", PeftFields(target_modules=("o_proj",), adapter_size=4),
                             {"model.layers.0.self_attn.o_proj": parts}, path=WHERE)
    assert _refused(base, bottleneck) == (
        f"{SOURCE}: 'model.layers.0.self_attn.o_proj.adapter_down.weight' is (4, 128); the layer has 256 outputs")
