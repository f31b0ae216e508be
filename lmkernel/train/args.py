"""`TrainArgs`: every setting of a training run in one dataclass, from `lmk train` flags or a YAML file
with the same keys, checked before anything loads."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmkernel.errors import LmkError
from lmkernel.train.optim import OPTIMIZERS, SCHEDULES

TASK_NAMES = ("clm", "mlm", "classify", "multi")  # multi: --data is a YAML of tasks (train/multitask.py)
DEFAULT_LR_FULL = 1e-4
DEFAULT_LR_LORA = 5e-4
PEFT_KINDS = ("full", "lora", "adalora", "ia3", "prompt", "prefix", "adapter")  # full: no adapter
# Peak learning rate per method when --lr is not given: the methods' papers' and peft's examples' magnitudes.
DEFAULT_LR_PEFT = {"lora": DEFAULT_LR_LORA, "adalora": 1e-3, "ia3": 3e-3, "prompt": 3e-2, "prefix": 1e-2, "adapter": 1e-3}
DEFAULT_EPOCHS_FULL = 5
DEFAULT_EPOCHS_LORA = 3
METRICS = ("loss", "perplexity", "accuracy", "macro_f1")
# Keys a YAML file may spell as the CLI flag does.
ALIASES = {"eval": "eval_data", "test": "test_data", "o": "output", "output_dir": "output", "lr_schedule": "schedule"}


@dataclass(frozen=True)
class TrainArgs:
    """One run's settings. Unset values (None) get the task's or the method's default."""

    task: str
    model: str
    data: str
    output: str
    eval_data: str | None = None
    holdout: float = 0.0  # fraction of --data held out (per label, for classify) to choose the best evaluation on
    test_data: str | None = None  # scored once, on the saved (best) model at the end; never used to choose
    lora: str | None = None  # "r=8,alpha=16,dropout=0.05,targets=q_proj+v_proj"; None: full fine-tuning
    peft: str | None = None  # lora, adalora, ia3, prompt, prefix, adapter (train/peft.py) or full; --lora SPEC = --peft lora
    # (a decoder trained with --task classify takes LoRA unless --peft says otherwise)
    peft_args: str = ""  # the method's settings, "k=v,k=v"
    epochs: int | None = None  # default 5 full, 3 LoRA (the measured PhraseBank defaults)
    max_steps: int | None = None  # optimizer steps; overrides `epochs` when set
    lr: float | None = None  # peak learning rate; default 1e-4 full, 5e-4 LoRA
    batch_size: int = 16  # examples (or packed rows) per process and micro-batch
    grad_accum: int = 1
    max_length: int | None = None  # tokens; default: the model's limit (1024 for clm)
    schedule: str = "linear"
    warmup: float = 0.06  # below 1: a fraction of the steps; from 1: a number of steps
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    clip: float = 1.0  # gradient-norm clipping; 0 turns it off
    bf16: bool = False  # bfloat16 autocast
    checkpointing: bool = True  # activation checkpointing: a third more compute, a fraction of the memory
    dropout: float | None = None  # overrides the model's hidden and attention dropout
    early_stop: int | None = None  # patience: evaluations without improvement before stopping
    metric: str | None = None  # the validation metric to follow; default accuracy (classify) or loss
    eval_every: int | None = None  # optimizer steps between evaluations; default once per epoch
    save_every: int | None = None  # optimizer steps between checkpoints; default at each evaluation or epoch end
    keep_checkpoints: int = 2
    augment: int = 0  # classify: augmented copies of each training sentence (0: off)
    adversarial: str | None = None  # fgm or pgd: also train on embeddings perturbed against the loss
    adv_epsilon: float = 1.0  # the perturbation's L2 radius, per micro-batch
    adv_steps: int = 3  # pgd: ascent steps
    init_from: str | None = None  # continual learning: start from this run's model, keep its task (train/continual.py)
    replay: float = 0.0  # with init_from: the fraction of the old run's training data mixed in
    ewc: float = 0.0  # with init_from: elastic weight consolidation strength (0: off)
    seed: int = 0
    device: str = "auto"

    @property
    def method(self) -> tuple[str, str] | None:
        """(kind, its settings) of a parameter-efficient run; None for full fine-tuning."""
        if self.lora is not None:
            return "lora", self.lora
        return (self.peft, self.peft_args) if self.peft not in (None, "full") else None

    @property
    def num_epochs(self) -> int:
        if self.epochs is not None:
            return self.epochs
        return DEFAULT_EPOCHS_LORA if self.method else DEFAULT_EPOCHS_FULL

    @property
    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return DEFAULT_LR_PEFT[self.method[0]] if self.method else DEFAULT_LR_FULL

    def check(self) -> TrainArgs:
        """Raise an LmkError naming the first setting out of range; return self."""
        problems = [
            (self.task not in TASK_NAMES, "task", f"one of {', '.join(TASK_NAMES)}"),
            (self.epochs is not None and self.epochs < 1, "epochs", "at least 1"),
            (self.max_steps is not None and self.max_steps < 1, "max-steps", "at least 1"),
            (self.lr is not None and not self.lr > 0, "lr", "a positive number"),
            (self.batch_size < 1, "batch-size", "at least 1"),
            (self.grad_accum < 1, "grad-accum", "at least 1"),
            (self.schedule not in SCHEDULES, "schedule", f"one of {', '.join(SCHEDULES)}"),
            (self.warmup < 0, "warmup", "0 or more"),
            (self.optimizer not in OPTIMIZERS, "optimizer", f"one of {', '.join(OPTIMIZERS)}"),
            (self.weight_decay < 0, "weight-decay", "0 or more"),
            (self.clip < 0, "clip", "0 or more"),
            (self.dropout is not None and not 0 <= self.dropout < 1, "dropout", "from 0 up to (not including) 1"),
            (self.early_stop is not None and self.early_stop < 1, "early-stop", "at least 1"),
            (not 0 <= self.holdout < 0.5, "holdout", "a fraction from 0 up to (not including) 0.5"),
            (self.holdout > 0 and self.eval_data is not None, "holdout",
             "a selection split from --data or --eval, not both"),
            (self.early_stop is not None and self.eval_data is None and self.holdout == 0, "early-stop",
             "used with --eval data or --holdout"),
            (self.metric is not None and self.metric not in METRICS, "metric", f"one of {', '.join(METRICS)}"),
            (self.metric in ("accuracy", "macro_f1") and self.task not in ("classify", "multi"), "metric",
             "loss or perplexity for this task"),
            (self.task == "multi" and (self.eval_data or self.test_data), "task",
             "given each task's eval and test files in the --data YAML (--task multi takes no --eval or --test)"),
            (self.task == "multi" and (self.method is not None or self.init_from is not None), "task",
             "full fine-tuning of one new model (--task multi takes no --lora, --peft or --init-from)"),
            (self.eval_every is not None and self.eval_every < 1, "eval-every", "at least 1"),
            (self.save_every is not None and self.save_every < 1, "save-every", "at least 1"),
            (self.keep_checkpoints < 1, "keep-checkpoints", "at least 1"),
            (self.augment < 0, "augment", "0 or more"),
            (self.augment > 0 and self.task != "classify", "augment", "used with --task classify"),
            (self.adversarial not in (None, "fgm", "pgd"), "adversarial", "fgm or pgd"),
            (not self.adv_epsilon > 0, "adv-epsilon", "a positive number"),
            (self.adv_steps < 1, "adv-steps", "at least 1"),
            (self.peft is not None and self.peft not in PEFT_KINDS, "peft", f"one of {', '.join(PEFT_KINDS)}"),
            (self.peft is not None and self.lora is not None, "peft", "unset when --lora is given (--lora SPEC is "
             "--peft lora --peft-args SPEC)"),
            (bool(self.peft_args) and self.peft in (None, "full"), "peft-args", "used with --peft KIND (not full)"),
            (self.init_from is not None and self.model != self.init_from, "init-from",
             "the run whose model this one starts from (leave --model out, or give the same run)"),
            (not 0 <= self.replay <= 1, "replay", "a fraction from 0 to 1"),
            (self.replay > 0 and self.init_from is None, "replay", "used with --init-from RUN"),
            (self.ewc < 0, "ewc", "0 or more"),
            (self.ewc > 0 and self.init_from is None, "ewc", "used with --init-from RUN"),
            (self.ewc > 0 and self.method is not None, "ewc", "used with full fine-tuning (it anchors the weights "
             "the old run trained; adapters start new)"),
        ]
        for bad, name, expected in problems:
            if bad:
                value = getattr(self, name.replace("-", "_"))
                raise LmkError(f"--{name} {value!r}: expected {expected}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str) -> TrainArgs:
        """Settings from a mapping (a YAML file, run.json); unknown keys and wrong types are errors naming `source`."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        out: dict[str, Any] = {}
        for raw_key, value in values.items():
            key = ALIASES.get(str(raw_key).replace("-", "_"), str(raw_key).replace("-", "_"))
            if key not in fields:
                raise LmkError(f"{source}: unknown setting '{raw_key}'; expected some of {', '.join(fields)}")
            out[key] = _coerce(value, fields[key].type, raw_key, source)
        if "init_from" in out and "model" not in out:
            out["model"] = out["init_from"]  # --init-from RUN starts from RUN's model
        missing = [name for name, f in fields.items() if f.default is dataclasses.MISSING and name not in out]
        if missing:
            raise LmkError(f"{source}: missing required setting(s) {', '.join(missing)}")
        return cls(**out)


def _coerce(value: Any, annotation: str, key: object, source: str) -> Any:
    """A value checked against a field's annotation ("int", "float | None", ...)."""
    kinds = [k.strip() for k in str(annotation).split("|")]
    if value is None:
        if "None" in kinds:
            return None
        raise LmkError(f"{source}: '{key}' must not be empty")
    if "bool" in kinds:
        if isinstance(value, bool):
            return value
    elif "int" in kinds:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif "float" in kinds:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, (str, Path)):
        return str(value)
    expected = next(k for k in kinds if k != "None")
    raise LmkError(f"{source}: '{key}' must be {expected}, got {value!r}")


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a YAML config file, or an LmkError naming the file."""
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmkError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise LmkError(f"{path}: not a readable YAML file ({exc})") from None
    if not isinstance(loaded, dict):
        raise LmkError(f"{path}: expected a mapping of settings (key: value lines)")
    return loaded
