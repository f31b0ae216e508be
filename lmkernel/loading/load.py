"""`load_model`: an alias, a Hugging Face directory, a GGUF file, an adapter or an ensemble in, a `LoadedModel`
out (its weights, any adapter and quantized layers in place); and `describe`, what `lmk info` reads of a source
without loading it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from lmkernel.config import ModelConfig
from lmkernel.errors import AdapterError, LmkError, ModelSourceError
from lmkernel.layers import cpu_kernels
from lmkernel.layers.linear import GGUFLinear
from lmkernel.layers.lora import linear_layers, merged_dense
from lmkernel.layers.quantized import QuantizationConfig, build_quantized
from lmkernel.loader import gguf_config, gguf_file, hf_config, hf_dir, packed_cache
from lmkernel.loader.adapter import CONFIG_FILE, LoraAdapter, head_architecture, head_labels, hf_names, match_adapter, \
    needs_head, to_peft_layout
from lmkernel.loader.peft_kinds import PeftAdapter, read_any_adapter
from lmkernel.loader.tokenizer import Tokenizer
from lmkernel.loading.loaded_model import LoadedModel
from lmkernel.models import model_class
from lmkernel.models.ensemble import EnsembleClassifier
from lmkernel.models.peft_adapters import apply_peft_adapter
from lmkernel.models.weights import build_on_meta, keep_gguf_blocks
from lmkernel.registry import ENSEMBLE_FILE, ModelSource, packed_cache_dir, resolve

Adapter = LoraAdapter | PeftAdapter  # what `adapter=` may name: LoRA/AdaLoRA, or IA3, prompt tuning, bottleneck

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | None = None) -> torch.dtype:
    """A torch dtype from a name ("float32", "bfloat16", "float16", "auto") or a torch dtype.

    "auto" is what measured fastest (BENCHMARKS.md): float32 on CPU, where bfloat16 generation
    ran slower here, and bfloat16 on CUDA.
    """
    if str(dtype) == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise LmkError(f"dtype {dtype} is not supported; expected one of {[*DTYPES, 'auto']}")
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise LmkError(f"dtype '{dtype}' is not supported; expected one of {[*DTYPES, 'auto']}")
    return DTYPES[name]


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" picks CUDA when present, else CPU; anything else must name an available device."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LmkError(f"device '{device}' is not a valid device; expected 'auto', 'cpu' or 'cuda[:N]'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LmkError(f"device '{device}' was asked for, but no CUDA device is available")
    if dev.type not in ("cpu", "cuda"):
        raise LmkError(f"device '{device}' is not supported; expected 'auto', 'cpu' or 'cuda[:N]'")
    return dev


def _open(source: ModelSource) -> tuple[ModelConfig, Tokenizer, gguf_file.GGUFFile | None]:
    """Config and tokenizer of a source, plus its GGUF reader when it is a GGUF file."""
    if source.kind == "gguf":
        reader = gguf_file.open_reader(source.path)
        metadata = gguf_file.read_metadata(reader)
        config = gguf_config.parse_config(source.path, reader, metadata)
        return config, Tokenizer.from_gguf(metadata, str(source.path)), reader
    return hf_config.parse_config(source.path), Tokenizer.from_hf_dir(source.path), None


QUANTIZATION_CHOICES = ("auto", "keep", None)


def load_model(
    name_or_path: str | Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
    quantization: str | None = "auto", adapter: str | Path | None = None, packed_cache: str | Path | None = "auto",
) -> LoadedModel:
    """Load an alias, a Hugging Face directory or a GGUF file into a `LoadedModel`; nothing is downloaded.

    `quantization="keep"` runs a GGUF's weights in the blocks they ship in (every linear layer and the
    embedding table, memory-mapped: no float copy of a weight is made), on the CPU kernels;
    `quantization=None` dequantizes them to `dtype`. "auto" (the default) keeps them on CPU and
    dequantizes for CUDA, and whenever an adapter is merged into the weights. A quantized directory
    always loads as saved. `adapter` (a PEFT LoRA directory) is merged into the weights; a LoRA
    directory given as the model loads the base its config names with it merged. `packed_cache` ("auto":
    `$LMK_HOME/packed`, a directory, or None) keeps the k-quant layers' decode layout after the first load
    of a GGUF file, so later loads map it instead of packing again.
    """
    if quantization not in QUANTIZATION_CHOICES:
        raise LmkError(f"quantization must be one of {QUANTIZATION_CHOICES}; got {quantization!r}")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    source = resolve(name_or_path)
    if source.kind == "ensemble":
        if adapter is not None:
            raise AdapterError(f"{source.path}: an ensemble takes no adapter; merge it into a member first")
        return _load_ensemble(source, torch_dtype, dev)
    lora = read_any_adapter(adapter) if adapter is not None else None
    if source.kind == "lora_adapter":
        if lora is not None:
            raise AdapterError(f"{source.path}: is itself an adapter; pass its base model as the model")
        lora = read_any_adapter(source.path)
        source = adapter_base(lora)
    keep = _keep_gguf(quantization, source, dev, lora)
    cache = packed_cache_dir() if packed_cache == "auto" else Path(packed_cache).expanduser() if packed_cache else None
    return _load(source, torch_dtype, dev, keep, lora, cache)


def _keep_gguf(quantization: str | None, source: ModelSource, dev: torch.device, lora: Adapter | None) -> bool:
    """Whether a GGUF's weights stay in their blocks (see `load_model`); an explicit "keep" that cannot be
    honoured is refused rather than ignored."""
    if source.kind != "gguf" or quantization is None:
        return False
    if quantization == "auto":
        return dev.type == "cpu" and lora is None
    if dev.type != "cpu":
        raise LmkError(f"{source.path}: quantization='keep' runs GGUF blocks on the CPU kernels; for {dev} load it "
                       "with quantization=None (dequantized) or 'auto'")
    if lora is not None:
        raise LmkError(f"{source.path}: an adapter is merged into float weights; load it with quantization=None or 'auto'")
    return True


def adapter_base(lora: Adapter) -> ModelSource:
    """The base model an adapter's config names (base_model_name_or_path), or a clear error."""
    where = f"{lora.path / CONFIG_FILE if lora.path else 'adapter'}: field 'base_model_name_or_path'"
    base = lora.config.base_model_name_or_path
    if not base:
        raise AdapterError(f"{where} is empty; name the base model yourself (load_model(BASE, adapter=DIR), "
                           "`lmk lora merge BASE DIR`)")
    try:
        source = resolve(base)
    except ModelSourceError as exc:
        raise AdapterError(f"{where} does not resolve: {exc}") from None
    if source.kind == "lora_adapter":
        raise AdapterError(f"{where} names another adapter ({base}); expected a base model")
    return source


def _load(source: ModelSource, dtype: torch.dtype, dev: torch.device, keep_gguf: bool,
          lora: Adapter | None, packed_cache: Path | None = None) -> LoadedModel:
    """A resolved source built on the meta device and given its weights, any adapter merged or applied."""
    config, tokenizer, reader = _open(source)
    if lora is not None and needs_head(lora, config):  # a task head, e.g. a classifier
        config = replace(config, hf_architecture=head_architecture(lora, config), id2label=head_labels(lora, config))
    model = build_on_meta(model_class(config), config)
    if reader is not None:
        layers = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
        loaded = gguf_file.load_tensors(source.path, reader, config, dtype, dev, layers.__contains__ if keep_gguf else None,
                                        _dequantize_blocks)
        tensors = loaded.tensors
        row_bytes = {name: tensors[f"{name}.blocks"].shape[1] for name in loaded.kept}
        tied = "lm_head" if config.tie_word_embeddings and "lm_head" in layers else None
        keep_gguf_blocks(model, loaded.kept, row_bytes, dtype, tied, "model.embed_tokens")
    else:
        tensors = hf_dir.load_tensors(source.path, dtype, dev)
        if (quant := hf_config.quantization_config(source.path)) is not None:
            build_quantized(model, QuantizationConfig.from_json(quant, str(source.path / "config.json")))
    if lora is None:
        model.load_weights(tensors, str(source.path))
    else:
        saved = {k: v.to(dev, dtype if v.is_floating_point() else v.dtype) for k, v in lora.saved.items()}
        model.load_weights({**tensors, **saved}, f"{source.path} with the adapter {lora.path}")
        _check_saved(model, config, lora)
        if isinstance(lora, PeftAdapter):
            model = apply_peft_adapter(model, config, lora, hf_names(linear_layers(model), config,
                                                                     head_architecture(lora, config)))
        else:
            config = _merge_adapter(model, config, lora)
    if reader is not None and keep_gguf and dev.type == "cpu":
        pack_layers(model, source.path, packed_cache)
    return LoadedModel(config, tokenizer, model.eval(), source, dtype, dev)


def pack_layers(model: nn.Module, gguf: Path, cache: Path | None) -> None:
    """K-quant projections into the decode layout, once: mapped from `cache` where it holds them for this
    file, else packed here (and written to `cache` for the next load, on a thread of its own)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, GGUFLinear) and m.packable}
    if not layers:
        return
    expected = {name: packed_cache.PackedLayer(m.gguf_type, m.packed_shape) for name, m in layers.items()}
    kept = packed_cache.read(cache, gguf, expected) if cache is not None else None
    for name, m in layers.items():
        if kept is not None:
            m.use_packed(kept[name])
        else:
            m.pack()
    if kept is None and cache is not None:
        packed_cache.write_in_background(cache, gguf, {name: (m.gguf_type, m.blocks) for name, m in layers.items()})


def _load_ensemble(source: ModelSource, dtype: torch.dtype, dev: torch.device) -> LoadedModel:
    """An `ensemble.json` directory: each member loaded as itself, checked to share labels and tokenizer."""
    where = source.path / ENSEMBLE_FILE
    try:
        spec = json.loads(where.read_text(encoding="utf-8"))
        members = [str(m) for m in spec["members"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LmkError(f"{where}: expected {{\"members\": [member directories]}} ({exc})") from None
    if len(members) < 2:
        raise LmkError(f"{where}: an ensemble needs two or more members; got {len(members)}")
    loaded = [load_model(source.path / m, dtype, dev, quantization=None) for m in members]
    first = loaded[0]
    for m, lm in zip(members, loaded):
        if not lm.config.is_encoder or getattr(lm.model, "classifier", None) is None:
            raise LmkError(f"{where}: member {m} is not an encoder classifier")
        if lm.config.id2label != first.config.id2label or lm.config.hidden_size != first.config.hidden_size:
            raise LmkError(f"{where}: member {m} has labels {lm.config.id2label} and width {lm.config.hidden_size}; "
                           f"the first has {first.config.id2label} and {first.config.hidden_size}")
        if lm.tokenizer.backend.to_str() != first.tokenizer.backend.to_str():
            raise LmkError(f"{where}: member {m} tokenizes differently from the first; members must share a tokenizer")
    model = EnsembleClassifier(first.config, [lm.model for lm in loaded])
    return LoadedModel(first.config, first.tokenizer, model.eval(), source, dtype, dev)


def _dequantize_blocks(blocks: torch.Tensor, gguf_type: int, width: int) -> torch.Tensor | None:
    """GGUF blocks to float32 by the compiled kernels (a second a billion weights); None where they cannot."""
    return cpu_kernels.gguf_dequantize(blocks, gguf_type, width) if cpu_kernels.gguf_block_layout(gguf_type) else None


def _check_saved(model: nn.Module, config: ModelConfig, lora: Adapter) -> None:
    """Every saved module of the adapter landed in a place of its own (not absent, not tied to another weight)."""
    state = model.state_dict()
    hf = {h: n for n, h in hf_names(state, config, head_architecture(lora, config)).items()}
    for name, t in lora.saved.items():
        ours = hf.get(name)
        if ours is None or not torch.equal(to_peft_layout(ours, state[ours], config).cpu(), t.to(state[ours].dtype)):
            raise AdapterError(f"{lora.source}: tensor '{name}' (modules_to_save) has no place of its own in this model "
                               "(absent, or tied to another weight)")


def _merge_adapter(model: nn.Module, config: ModelConfig, lora: LoraAdapter) -> ModelConfig:
    """Fold the adapter's LoRA layers into the weights; returns the config (untied if a tied head got its own weight)."""
    distinct = len({id(p) for p in model.parameters()})
    shapes = {n: (m.in_features, m.out_features) for n, m in linear_layers(model).items()}
    for t in match_adapter(lora, shapes, config):
        model.set_submodule(t.name, merged_dense(model.get_submodule(t.name), t.a, t.b, t.scaling, t.name))
    if config.tie_word_embeddings and len({id(p) for p in model.parameters()}) > distinct:
        config = replace(config, tie_word_embeddings=False)  # the tied head got a weight of its own
        model.config = config
    return config


def describe(source: ModelSource) -> dict[str, object]:
    """What `lmk info` prints: read from configs and file headers, without loading any weights."""
    if source.kind == "lora_adapter":
        lora = read_any_adapter(source.path)
        c = lora.config
        if isinstance(lora, PeftAdapter):
            what = f"{lora.kind}, {len(lora.modules)} layers" if lora.modules else f"{lora.kind}, {c.num_virtual_tokens} virtual tokens"
        else:
            what = f"{lora.kind}, r={c.r}, alpha={c.lora_alpha:g}, {len(lora.lora)} layers"
        return {"adapter": f"{source.path} ({what}, task {c.task_type})", **describe(adapter_base(lora))}
    config, tokenizer, reader = _open(source)
    params = gguf_file.parameter_count(reader) if reader is not None else hf_dir.parameter_count(source.path)
    return {
        "path": str(source.path),
        "format": "GGUF" if source.kind == "gguf" else "Hugging Face directory (safetensors)",
        "architecture": f"{config.architecture} ({config.hf_architecture or config.hf_model_type})",
        "parameters": f"{params:,} ({params / 1e6:.1f}M)",
        "stored dtype": config.stored_dtype,
        "vocabulary size": config.vocab_size,
        "context length": config.max_position_embeddings,
        "layers / hidden / heads (kv)": f"{config.num_layers} / {config.hidden_size} / {config.num_heads} ({config.num_kv_heads})",
        "chat template": "yes" if tokenizer.chat_template else "no",
    }
