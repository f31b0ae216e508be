"""The training loop: one flat function over `TrainArgs`, in the manner of nanoGPT.

Each optimizer step takes one global batch (batch size x gradient accumulation x processes),
cuts it into micro-batches, sums each one's loss divided by the global count of scored targets,
adds the gradients across processes, clips and steps. Evaluation, early stopping, the best model
and checkpoints happen between steps; everything random is seeded or restored from a checkpoint,
so a resumed run continues exactly as the uninterrupted one would have.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn

from lmkernel.errors import LmkError
from lmkernel.loader import hf_dir
from lmkernel.loader.hf_export import hf_config, prepare_output, save_model_dir
from lmkernel.loading import LoadedModel, load_model, resolve_device
from lmkernel.registry import RUN_FILE
from lmkernel.train import distributed
from lmkernel.train.args import TrainArgs
from lmkernel.train.checkpoint import (MetricsLog, Position, latest_checkpoint, load_checkpoint, model_dir,
                                       read_settings, save_checkpoint, write_settings)
from lmkernel.train.data import epoch_batches, split_batch
from lmkernel.train.distributed import ProcessGroup
from lmkernel.train.optim import build_optimizer, build_schedule
from lmkernel.train.tasks import TASKS, Classification, Task

LORA_TASK_TYPES = {"clm": "CAUSAL_LM", "mlm": "FEATURE_EXTRACTION", "classify": "SEQ_CLS"}


class TrainingError(LmkError):
    """The run cannot go on (a NaN loss); the last good checkpoint is kept."""


@dataclass
class TrainResult:
    """What a finished run reports."""

    run_dir: Path
    steps: int
    train_loss: float
    eval_metrics: dict[str, float] = field(default_factory=dict)
    test_metrics: dict[str, float] = field(default_factory=dict)  # the saved model on --test, scored once
    best: float | None = None
    best_step: int = 0
    stopped_early: bool = False
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    trainable_parameters: int = 0
    old_task_before: dict[str, float] = field(default_factory=dict)  # --init-from: the old task, before training
    old_task_after: dict[str, float] = field(default_factory=dict)  # ... and on the saved model after it


def _set_dropout(model: nn.Module, p: float) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        if hasattr(module, "dropout_p"):
            module.dropout_p = p


def _base_name(model: str) -> str:
    """How a LoRA adapter names its base: an alias as is, a path made absolute."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def _check_run_dir(args: TrainArgs, resume: bool, overwrite: bool) -> None:
    """A resumed run must keep its settings (anything else would not continue it exactly); a new
    one needs an empty or absent directory."""
    run_dir = Path(args.output)
    if not resume:
        prepare_output(run_dir, overwrite)
        if overwrite and run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / RUN_FILE).is_file():
            raise LmkError(f"-o {run_dir}: --overwrite replaces only an earlier training run, and this directory "
                           f"has no {RUN_FILE}; choose another directory")
        return
    saved = TrainArgs.from_mapping(read_settings(run_dir), str(run_dir / "run.json"))
    changed = [k for k, v in args.to_dict().items() if saved.to_dict()[k] != v and k != "device"]
    if changed:
        raise LmkError(f"--resume: {', '.join(changed)} differ from the settings the run was started with "
                       f"({run_dir / 'run.json'}); resume with the same settings")


def _progress(console: Console | None, total: int) -> Progress:
    return Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} tok/s"),
        TimeRemainingColumn(), console=console, disable=console is None, transient=False,
    )


def _task(args: TrainArgs, loaded: LoadedModel) -> Task:
    if args.task == "multi":
        from lmkernel.train.multitask import MultiTask

        return MultiTask(loaded.tokenizer, loaded.config, args.max_length, args.seed)
    if args.task == "classify":
        return Classification(loaded.tokenizer, loaded.config, args.max_length, args.seed, args.augment)
    return TASKS[args.task](loaded.tokenizer, loaded.config, args.max_length, args.seed)


def _planned_steps(args: TrainArgs, num_items: int, world: int) -> int:
    """The run's optimizer steps, as the loop below counts them (AdaLoRA's budget schedule needs them up front)."""
    return args.max_steps or args.num_epochs * math.ceil(num_items / (args.batch_size * world * args.grad_accum))


def train(args: TrainArgs, resume: bool = False, overwrite: bool = False, console: Console | None = None,
          group: ProcessGroup | None = None,
          on_eval: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Run (or, with `resume`, continue) the training `args` describe; return its summary.

    Every input is read and checked before the first step; errors name the file and line. The best
    evaluation (on --eval, or on the --holdout split of --data) chooses the saved model; --test is scored
    once, on that saved model, at the end. `on_eval(step, scores)` sees each evaluation (a search prunes
    trials through it by raising).
    """
    args.check()
    if group is None:
        group = distributed.init(resolve_device(args.device))
    device = group.device
    run_dir = Path(args.output)
    _check_run_dir(args, resume, overwrite)
    torch.manual_seed(args.seed)

    if args.init_from is not None:
        from lmkernel.train.continual import OldTask

        OldTask.settings(Path(args.init_from), args.task)  # a clear error before any model loads
    loaded = load_model(args.model, device="cpu", quantization=None)  # training updates float weights
    if args.task == "classify" and not loaded.config.is_encoder and args.peft is None and args.lora is None:
        args = replace(args, lora="")  # a decoder classifier: LoRA (default settings) unless --peft full or another
    task = _task(args, loaded)
    items, eval_items = task.read_split(Path(args.data), "--data", args.holdout)
    if args.eval_data:
        eval_items = task.read(Path(args.eval_data), "--eval", training=False)
    test_items = task.read(Path(args.test_data), "--test", training=False) if args.test_data else None
    old = None
    if args.init_from is not None:
        old = OldTask.read(Path(args.init_from), args.task, task)
        items = items + old.replay(args.replay, args.seed)
    if group.is_main and not resume:
        if overwrite and (run_dir / RUN_FILE).is_file():
            shutil.rmtree(run_dir)
        write_settings(run_dir, args.to_dict())
    distributed.barrier(group)
    def checkpoint_tensors() -> dict[str, torch.Tensor]:
        source = loaded.source
        return hf_dir.load_tensors(source.path, torch.float32, torch.device("cpu")) if source.kind == "hf_dir" else {}

    model, config = task.prepare(loaded.model, loaded.config, checkpoint_tensors)
    if args.dropout is not None:
        _set_dropout(model, args.dropout)
        config = replace(config, hidden_dropout=args.dropout, attention_dropout=args.dropout, classifier_dropout=None)
    lora, peft, new_head = None, None, task.new_modules()
    method = args.method
    if method is not None and method[0] == "lora":
        from lmkernel.train import lora as lora_lib

        lora = lora_lib.LoraSettings.parse(method[1])
        lora_lib.apply_lora(model, lora, modules_to_save=new_head, seed=args.seed)
    elif method is not None:
        from lmkernel.train import peft as peft_lib

        settings = peft_lib.PeftSettings.parse(*method)
        if settings.kind in ("prompt", "prefix") and args.task == "mlm":
            raise LmkError(f"--peft {settings.kind}: virtual tokens train classifiers and decoders "
                           "(--task classify or clm), not mlm")
        peft = peft_lib.start(model, settings, new_head, args.seed, _planned_steps(args, len(items), group.world))
        model = peft.model
    if method is None and args.task != "multi":
        hf_config(config, torch.float32)  # a model lmkernel cannot save is refused now, not after training
    model.checkpoint_layers = args.checkpointing
    model.to(device).train()
    attack = None
    if args.adversarial is not None:
        from lmkernel.train.adversarial import EmbeddingAttack

        attack = EmbeddingAttack(model, config.vocab_size, args.adversarial, args.adv_epsilon, args.adv_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    penalties = [peft.extra_loss] if peft is not None else []  # terms added to the loss once per step
    old_before: dict[str, float] = {}
    old_after: dict[str, float] = {}
    if old is not None:
        if args.ewc > 0:
            from lmkernel.train.continual import ElasticWeights

            penalties.append(ElasticWeights(model, task, old.train_items, args.ewc, args.seed, device).penalty)
        if group.is_main and not resume:
            model.eval()
            with torch.inference_mode():
                old_before = task.evaluate(model, old.eval_items, args.batch_size * 2, device)
            model.train()

    lengths = [task.length(item) for item in items]
    parts = group.world * args.grad_accum
    global_batch = args.batch_size * parts
    steps_per_epoch = math.ceil(len(items) / global_batch)
    total = args.max_steps or args.num_epochs * steps_per_epoch  # --max-steps overrides --epochs, as in transformers
    warmup = int(args.warmup) if args.warmup >= 1 else round(args.warmup * total)
    optimizer = build_optimizer(args.optimizer, model, args.peak_lr, args.weight_decay)
    scheduler = build_schedule(optimizer, args.schedule, warmup, total)
    eval_every = args.eval_every or steps_per_epoch
    save_every = args.save_every or eval_every
    metric = args.metric or task.metric
    higher = metric in ("accuracy", "macro_f1")

    position = Position()
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        position = load_checkpoint(checkpoint, model, optimizer, scheduler)
    log = MetricsLog(run_dir, position.step if resume else None) if group.is_main else None

    def save_model() -> None:
        target = model_dir(run_dir)
        if lora is not None:
            from lmkernel.train.lora import save_adapter

            save_adapter(model, lora, target, base_model=_base_name(args.model), task_type=LORA_TASK_TYPES[args.task],
                         modules_to_save=new_head, hf_architecture=config.hf_architecture, id2label=config.id2label or None,
                         overwrite=True)
        elif args.task == "multi":
            task.save(model, target, loaded.tokenizer)
        elif peft is not None:
            peft.save(target, _base_name(args.model), LORA_TASK_TYPES[args.task], new_head, config.hf_architecture,
                      config.id2label or None)
        else:
            save_model_dir(model, config, loaded.tokenizer, torch.float32, target, overwrite=True)

    def evaluate() -> dict[str, float]:
        model.eval()
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
            scores = task.evaluate(model, eval_items, args.batch_size * 2, device)
        model.train()
        return scores

    started, tokens, last_loss, scores = time.perf_counter(), 0, float("nan"), {}
    stopped_early = False
    progress = _progress(console if group.is_main else None, total)
    bar = progress.add_task("train", total=total, completed=position.step, loss=0.0, lr=0.0, tps=0.0)
    with progress:
        while position.step < total and not stopped_early:
            batches = epoch_batches(lengths, global_batch, args.seed, position.epoch, by_length=True)
            for global_items in batches[position.batch_in_epoch :]:
                micro = [task.collate(items, chunk, position.epoch, device)
                         for chunk in split_batch(global_items, parts)[group.rank :: group.world] if chunk]
                count = _global_count(sum(b.num_targets for b in micro), group)
                loss_sum = torch.zeros((), device=device)

                def backward(scored: bool = False) -> None:
                    nonlocal loss_sum
                    for batch in micro:
                        with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
                            part = task.loss_sum(model, batch)
                        (part / count).backward()
                        if scored:
                            loss_sum += part.detach().float()

                for penalty in penalties:  # AdaLoRA's orthogonality, EWC: once per step (the processes' sum)
                    if (extra := penalty()) is not None:
                        (extra / group.world).backward()
                if attack is None:
                    backward(scored=True)
                else:  # the reported loss is the clean pass's
                    calls = iter([True])
                    attack.step(lambda: backward(scored=next(calls, False)), trainable)
                loss = float(distributed.all_reduce_gradients(model, loss_sum / count, group))
                if not math.isfinite(loss):
                    if log is not None:
                        log.close()
                    done = latest_checkpoint(run_dir)
                    kept = f"the last good checkpoint is {done}" if done else "no checkpoint had been written yet"
                    raise TrainingError(f"the loss became {loss} at step {position.step + 1} (epoch {position.epoch + 1}); "
                                        f"the run stopped; {kept}. Try a lower --lr or --clip.")
                if args.clip > 0:
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.clip)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                if peft is not None:
                    peft.after_step(position.step + 1)
                optimizer.zero_grad(set_to_none=True)
                position.step += 1
                position.batch_in_epoch += 1
                step_tokens = _global_count(sum(b.num_tokens for b in micro), group)
                tokens += step_tokens
                elapsed = time.perf_counter() - started
                tps = tokens / elapsed
                last_loss = loss
                if log is not None:
                    log.write({"step": position.step, "epoch": position.epoch + 1, "loss": loss, "lr": lr,
                               "tokens": step_tokens, "tokens_per_s": tps, "elapsed_s": elapsed}, "train")
                progress.update(bar, completed=position.step, loss=loss, lr=lr, tps=tps)
                final = position.step >= total
                if eval_items is not None and (position.step % eval_every == 0 or final):
                    stop = False
                    if group.is_main:
                        scores = evaluate()
                        log.write({"step": position.step, **scores}, "eval")
                        if on_eval is not None:
                            on_eval(position.step, scores)
                        value = scores[metric]
                        if position.best is None or (value > position.best if higher else value < position.best):
                            position.best, position.best_step, position.evals_without_gain = value, position.step, 0
                            save_model()
                        else:
                            position.evals_without_gain += 1
                        stop = args.early_stop is not None and position.evals_without_gain >= args.early_stop
                    stopped_early = distributed.broadcast_flag(stop, group)
                if group.is_main and position.step % save_every == 0 and not (final or stopped_early):  # resumable
                    save_checkpoint(run_dir, model, optimizer, scheduler, position, args.keep_checkpoints)
                if final or stopped_early:
                    break
            else:
                position.epoch += 1
                position.batch_in_epoch = 0
    if attack is not None:
        attack.close()
    test_scores: dict[str, float] = {}
    if group.is_main:
        if eval_items is None:
            save_model()
        if test_items is not None:
            test_scores = _score_saved_model(task, run_dir, test_items, args.batch_size * 2, device)
        elif args.task == "multi":
            test_scores = task.score_saved(model_dir(run_dir), args.batch_size * 2, device)
        if test_scores:
            log.write({"step": position.step, "split": "test", **test_scores}, "test")
        if old is not None:
            old_after = _score_saved_model(task, run_dir, old.eval_items, args.batch_size * 2, device)
            if old_before:
                log.write({"step": 0, "split": "old", "when": "before", **old_before}, "old")
            log.write({"step": position.step, "split": "old", "when": "after", **old_after}, "old")
        log.close()
    distributed.barrier(group)
    seconds = time.perf_counter() - started
    return TrainResult(run_dir, position.step, last_loss, scores, test_scores, position.best, position.best_step,
                       stopped_early, seconds, tokens / seconds if seconds else 0.0, sum(p.numel() for p in trainable),
                       old_before, old_after)


def _score_saved_model(task: Task, run_dir: Path, items: list, batch_size: int, device: torch.device) -> dict[str, float]:
    """The task's metrics of the model the run saved (its best evaluation), loaded as a user loads it."""
    saved = load_model(str(model_dir(run_dir)), device=str(device), quantization=None)
    saved.model.eval()
    with torch.inference_mode():
        return task.evaluate(saved.model, items, batch_size, device)


def _global_count(local: int, group: ProcessGroup) -> int:
    """A count summed over all processes."""
    if group.world == 1:
        return local
    t = torch.tensor([float(local)], device=group.device)
    torch.distributed.all_reduce(t)
    return int(t.item())


def summary_table(result: TrainResult, metric: str | None) -> Table:
    """The end-of-run summary `lmk train` prints."""
    table = Table(show_header=False, title="training finished")
    rows: list[tuple[str, str]] = [
        ("run directory", str(result.run_dir)),
        ("model", str(model_dir(result.run_dir))),
        ("optimizer steps", f"{result.steps:,}"),
        ("trainable parameters", f"{result.trainable_parameters:,}"),
        ("last training loss", f"{result.train_loss:.4f}"),
        ("time", f"{result.seconds:.1f} s ({result.tokens_per_second:,.0f} tokens/s)"),
    ]
    if result.eval_metrics:
        rows.append(("last evaluation", ", ".join(f"{k} {v:.4f}" for k, v in result.eval_metrics.items())))
        rows.append((f"best {metric}", f"{result.best:.4f} at step {result.best_step}"))
    if result.test_metrics:
        rows.append(("test (saved model)", ", ".join(f"{k} {v:.4f}" for k, v in result.test_metrics.items())))
    for when, scores in (("before", result.old_task_before), ("after", result.old_task_after)):
        if scores:
            rows.append((f"old task, {when}", ", ".join(f"{k} {v:.4f}" for k, v in scores.items())))
    if result.stopped_early:
        rows.append(("early stop", "yes: no gain in the last evaluations"))
    for key, value in rows:
        table.add_row(key, value)
    return table
