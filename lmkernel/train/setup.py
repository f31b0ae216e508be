"""What a training run starts from: its data (and an earlier task's, with --init-from), and its model as the
fine-tuning method makes it (full, LoRA, another PEFT kind), with how that method saves it.

Calls that draw random numbers (LoRA's and the heads' initial weights, the attack's) run in a fixed order after
the run's seed is set, so a resumed run rebuilds the very model it checkpointed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmkernel.config import ModelConfig
from lmkernel.errors import LmkError
from lmkernel.loader import hf_dir
from lmkernel.loader.hf_export import hf_config, save_model_dir
from lmkernel.loading import LoadedModel
from lmkernel.train.args import TrainArgs
from lmkernel.train.tasks import TASKS, Classification, Task

LORA_TASK_TYPES = {"clm": "CAUSAL_LM", "mlm": "FEATURE_EXTRACTION", "classify": "SEQ_CLS"}


@dataclass
class RunData:
    """The items a run trains on, evaluates on (the best model's choice) and tests once; `old`: --init-from's task."""

    task: Task
    items: list[Any]
    eval_items: list[Any] | None
    test_items: list[Any] | None
    old: Any = None  # continual.OldTask


def choose_task(args: TrainArgs, loaded: LoadedModel) -> Task:
    if args.task == "multi":
        from lmkernel.train.multitask import MultiTask

        return MultiTask(loaded.tokenizer, loaded.config, args.max_length, args.seed)
    if args.task == "classify":
        return Classification(loaded.tokenizer, loaded.config, args.max_length, args.seed, args.augment)
    return TASKS[args.task](loaded.tokenizer, loaded.config, args.max_length, args.seed)


def read_data(args: TrainArgs, task: Task) -> RunData:
    """Every data file read and checked (errors name the file and line); --init-from's replay joins the items."""
    items, eval_items = task.read_split(Path(args.data), "--data", args.holdout)
    if args.eval_data:
        eval_items = task.read(Path(args.eval_data), "--eval", training=False)
    test_items = task.read(Path(args.test_data), "--test", training=False) if args.test_data else None
    old = None
    if args.init_from is not None:
        from lmkernel.train.continual import OldTask

        old = OldTask.read(Path(args.init_from), args.task, task)
        items = items + old.replay(args.replay, args.seed)
    return RunData(task, items, eval_items, test_items, old)


def planned_steps(args: TrainArgs, num_items: int, world: int) -> int:
    """The run's optimizer steps, as the loop counts them (AdaLoRA's budget schedule needs them up front)."""
    return args.max_steps or args.num_epochs * math.ceil(num_items / (args.batch_size * world * args.grad_accum))


def base_name(model: str) -> str:
    """How a LoRA adapter names its base: an alias as is, a path made absolute."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def set_dropout(model: nn.Module, p: float) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        if hasattr(module, "dropout_p"):
            module.dropout_p = p


@dataclass
class Adapted:
    """The model the run trains, as its method made it, and what the method adds to each step."""

    model: nn.Module
    config: ModelConfig
    save: Callable[[Path], None]  # writes the model (or adapter) the way users load it
    penalties: list[Callable[[], torch.Tensor | None]]  # loss terms added once a step (AdaLoRA's orthogonality)
    after_step: Callable[[int], None]  # AdaLoRA's rank budget


def adapt(args: TrainArgs, task: Task, loaded: LoadedModel, num_items: int, world: int) -> Adapted:
    """The task's model (its head added), its dropout, and the fine-tuning method `args.method` applied."""
    def checkpoint_tensors() -> dict[str, torch.Tensor]:
        source = loaded.source
        return hf_dir.load_tensors(source.path, torch.float32, torch.device("cpu")) if source.kind == "hf_dir" else {}

    model, config = task.prepare(loaded.model, loaded.config, checkpoint_tensors)
    if args.dropout is not None:
        set_dropout(model, args.dropout)
        config = replace(config, hidden_dropout=args.dropout, attention_dropout=args.dropout, classifier_dropout=None)
    new_head, method, base = task.new_modules(), args.method, base_name(args.model)
    if method is not None and method[0] == "lora":
        from lmkernel.train import lora as lora_lib

        settings = lora_lib.LoraSettings.parse(method[1])
        lora_lib.apply_lora(model, settings, modules_to_save=new_head, seed=args.seed)

        def save_lora(target: Path) -> None:
            lora_lib.save_adapter(model, settings, target, base_model=base, task_type=LORA_TASK_TYPES[args.task],
                                  modules_to_save=new_head, hf_architecture=config.hf_architecture,
                                  id2label=config.id2label or None, overwrite=True)

        return Adapted(model, config, save_lora, [], lambda step: None)
    if method is not None:
        from lmkernel.train import peft as peft_lib

        peft_settings = peft_lib.PeftSettings.parse(*method)
        if peft_settings.kind in ("prompt", "prefix") and args.task == "mlm":
            raise LmkError(f"--peft {peft_settings.kind}: virtual tokens train classifiers and decoders "
                           "(--task classify or clm), not mlm")
        peft = peft_lib.start(model, peft_settings, new_head, args.seed, planned_steps(args, num_items, world))

        def save_peft(target: Path) -> None:
            if args.task == "multi":
                task.save(peft.model, target, loaded.tokenizer)
            else:
                peft.save(target, base, LORA_TASK_TYPES[args.task], new_head, config.hf_architecture, config.id2label or None)

        return Adapted(peft.model, config, save_peft, [peft.extra_loss], peft.after_step)
    if args.task == "multi":
        return Adapted(model, config, lambda target: task.save(model, target, loaded.tokenizer), [], lambda step: None)
    hf_config(config, torch.float32)  # a model lmkernel cannot save is refused now, not after training
    return Adapted(model, config, lambda target: save_model_dir(model, config, loaded.tokenizer, torch.float32, target,
                                                                overwrite=True), [], lambda step: None)
