"""The one path from a float model to a quantized Hugging Face directory, which `lmk quantize` and
`lmk bench compress` both run: check the request, round the weights (int4 by GPTQ on calibration
sequences or to nearest; int8 per channel), refine the int4 scales/minimums so the model's next-token
distribution matches a float copy's (causal models), and save with a `quantization_config`."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmkernel.compress.gptq import gptq_quantize
from lmkernel.compress.quantize import DEFAULT_SKIP, QuantizationConfig, check_method, quantize_model, storage_dtypes
from lmkernel.compress.refine import RefineResult, refine_int4
from lmkernel.errors import LmkError
from lmkernel.loader.hf_export import prepare_output, save_model_dir
from lmkernel.loading import LoadedModel, load_model

ROUNDINGS = ("gptq", "nearest")

# Calibration sequences for a loaded model, asked for only when GPTQ or the refinement needs them.
Calibration = Callable[[LoadedModel], Sequence[list[int]]]


@dataclass(frozen=True)
class QuantizeSettings:
    """What to quantize and how; `check()` refuses a bad request before any model is loaded."""

    method: str  # int8, int4 or int8-dynamic (compress/quantize.py)
    group_size: int | None = 128  # int4: the group along the input dimension
    rounding: str = "gptq"  # int4: gptq (calibrated) or nearest
    refine_steps: int | None = None  # int4: None = one pass over the calibration (causal models only), 0 = off
    skip: tuple[str, ...] = DEFAULT_SKIP  # module name patterns left in float

    def check(self) -> QuantizeSettings:
        check_method(self.method, self.group_size)
        if self.rounding not in ROUNDINGS:
            raise LmkError(f"--rounding must be gptq or nearest; got '{self.rounding}'")
        steps = self.refine_steps
        if steps is not None and (steps < 0 or (steps > 0 and self.method != "int4")):
            raise LmkError(f"--refine-steps applies to int4 and must be >= 0; got {steps} with --method {self.method}")
        return self

    @property
    def gptq(self) -> bool:
        return self.method == "int4" and self.rounding == "gptq"

    def refines(self, lm: LoadedModel) -> bool:
        """Whether `lm` gets the refinement: int4 with steps not 0; by default only a causal model
        (asked for explicitly on an encoder, `refine_int4` refuses it)."""
        if self.method != "int4" or self.refine_steps == 0:
            return False
        return not (self.refine_steps is None and lm.config.is_encoder)


@dataclass(frozen=True)
class QuantizeResult:
    config: QuantizationConfig  # what was quantized, as written into config.json
    path: Path  # the directory written
    refined: RefineResult | None  # the refinement's steps and KL, when it ran


def quantize_pipeline(model: LoadedModel | str | Path, settings: QuantizeSettings, output: Path,
                      calibration: Calibration, overwrite: bool = False, dtype: str = "float32", device: str = "cpu",
                      log: Callable[[str], None] | None = None) -> QuantizeResult:
    """Quantize `model` as `settings` say and write it to `output`.

    `model` is loaded here (float weights, `dtype` on `device`) after the checks when it is a name or
    path; a `LoadedModel` is quantized in place. `calibration` is called once, only when GPTQ or the
    refinement needs sequences. `log` receives the refinement's progress lines.
    """
    settings.check()
    prepare_output(output, overwrite)
    lm = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype, device=device, quantization=None)
    refine = settings.refines(lm)
    seqs = calibration(lm) if settings.gptq or refine else []
    teacher = copy.deepcopy(lm.model) if refine else None  # the float model the refinement matches
    if settings.gptq:
        done = gptq_quantize(lm, seqs, settings.group_size, settings.skip)
    else:
        done = quantize_model(lm.model, settings.method, settings.group_size, settings.skip)
    refined = None
    if teacher is not None:
        refined = refine_int4(lm, teacher, seqs, settings.refine_steps, log=log)
        done = dataclasses.replace(done, refine_steps=refined.steps)
        del teacher
    path = save_model_dir(lm.model, lm.config, lm.tokenizer, lm.dtype, output, overwrite,
                          {"quantization_config": done.to_json()}, store_as=storage_dtypes(lm.model))
    return QuantizeResult(done, path, refined)
