"""A quantized checkpoint's layout: which linear layers it stores as int8 or int4 (`QuantizationConfig`,
the `quantization_config` of its config.json), and giving a freshly built model those layers before its
weights load. Making such a checkpoint is `compress/`'s job; reading one is every loader's."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lmkernel.errors import LmkError
from lmkernel.layers.linear import DynamicInt8Linear, Int4Linear, Int8Linear

METHODS = ("int8", "int4", "int8-dynamic")
DEFAULT_SKIP = ("lm_head", "*.decoder", "classifier", "*.pooler.dense")


@dataclass(frozen=True)
class QuantizationConfig:
    """What was quantized and how; written into config.json as `quantization_config`."""

    method: str
    group_size: int | None = None
    skip: tuple[str, ...] = DEFAULT_SKIP
    quantized: list[str] = field(default_factory=list)
    rounding: str = "nearest"  # or "gptq"; informational, the stored layout is the same
    refine_steps: int = 0  # int4: steps of end-to-end scale/minimum refinement (compress/refine.py)

    def to_json(self) -> dict[str, object]:
        return {"quant_method": "lmkernel", "method": self.method, "group_size": self.group_size,
                "rounding": self.rounding, "refine_steps": self.refine_steps,
                "modules_not_converted": list(self.skip), "quantized_modules": list(self.quantized)}

    @classmethod
    def from_json(cls, data: dict[str, object], source: str) -> QuantizationConfig:
        if data.get("quant_method") != "lmkernel" or data.get("method") not in METHODS:
            raise LmkError(f"{source}: quantization_config {data} is not one lmkernel wrote "
                           f"(expected quant_method 'lmkernel' and method in {METHODS})")
        steps = data.get("refine_steps", 0)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise LmkError(f"{source}: quantization_config.refine_steps must be a whole number >= 0; got {steps!r}")
        return cls(str(data["method"]), data.get("group_size"), tuple(data.get("modules_not_converted", ())),  # type: ignore[arg-type]
                   list(data.get("quantized_modules", [])), str(data.get("rounding", "nearest")), steps)  # type: ignore[arg-type]


def build_quantized(model: nn.Module, config: QuantizationConfig) -> None:
    """Give a freshly built (meta) model the quantized layers a saved checkpoint holds, before loading it."""
    for name in config.quantized:
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise LmkError(f"quantization_config names module '{name}', which this architecture does not have") from None
        if not isinstance(layer, nn.Linear):
            raise LmkError(f"quantization_config names module '{name}', which is not a linear layer")
        bias = layer.bias is not None
        new: nn.Module
        if config.method in ("int8", "int8-dynamic"):
            kind = DynamicInt8Linear if config.method == "int8-dynamic" else Int8Linear
            group = config.group_size if config.method == "int8" else None  # int8 groups: GGUF Q8_0 kept
            new = kind(layer.in_features, layer.out_features, bias, layer.weight.dtype, group)
        else:
            new = Int4Linear(layer.in_features, layer.out_features, bias, config.group_size or 128, layer.weight.dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
