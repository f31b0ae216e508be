"""The training loop: `train()` is a short loop over optimizer steps; what a run starts from is in `setup.py`
(its data, and the model as its fine-tuning method makes it), what happens between steps in `callbacks.py`
(evaluation, the best model, early stopping; checkpoints).

Each optimizer step takes one global batch (batch size x gradient accumulation x processes),
cuts it into micro-batches, sums each one's loss divided by the global count of scored targets,
adds the gradients across processes, clips and steps. Everything random is seeded or restored from a
checkpoint, so a resumed run continues exactly as the uninterrupted one would have.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn

from lmkernel.errors import LmkError
from lmkernel.loader.hf_export import prepare_output
from lmkernel.loading import LoadedModel, load_model, resolve_device
from lmkernel.registry import RUN_FILE
from lmkernel.train import distributed
from lmkernel.train.args import TrainArgs
from lmkernel.train.callbacks import BestModel, Checkpoints
from lmkernel.train.checkpoint import (MetricsLog, Position, latest_checkpoint, load_checkpoint, model_dir,
                                       read_settings, save_checkpoint, write_settings)
from lmkernel.train.data import epoch_batches, split_batch
from lmkernel.train.distributed import ProcessGroup
from lmkernel.train.optim import build_optimizer, build_schedule
from lmkernel.train.setup import Adapted, RunData, adapt, choose_task, read_data
from lmkernel.train.tasks import Task

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


@dataclass
class Run:
    """One run between steps: what it trains, on what, and where it stands (built once by `_start`)."""

    args: TrainArgs
    group: ProcessGroup
    run_dir: Path
    loaded: LoadedModel
    data: RunData
    adapted: Adapted
    penalties: list[Callable[[], torch.Tensor | None]]  # loss terms added once a step (AdaLoRA's, EWC's)
    attack: Any  # adversarial.EmbeddingAttack, or None
    trainable: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    position: Position
    log: MetricsLog | None  # the main process's
    total: int  # optimizer steps
    old_before: dict[str, float] = field(default_factory=dict)  # --init-from: the old task, before training

    @property
    def model(self) -> nn.Module:
        return self.adapted.model

    @property
    def parts(self) -> int:
        """Micro-batches a global batch is cut into, across the processes."""
        return self.group.world * self.args.grad_accum

    def evaluate(self, items: list[Any]) -> dict[str, float]:
        self.model.eval()
        with torch.inference_mode(), torch.autocast(self.group.device.type, torch.bfloat16, enabled=self.args.bf16):
            scores = self.data.task.evaluate(self.model, items, self.args.batch_size * 2, self.group.device)
        self.model.train()
        return scores


def train(args: TrainArgs, resume: bool = False, overwrite: bool = False, console: Console | None = None,
          group: ProcessGroup | None = None,
          on_eval: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Run (or, with `resume`, continue) the training `args` describe; return its summary.

    Every input is read and checked before the first step; errors name the file and line. The best
    evaluation (on --eval, or on the --holdout split of --data) chooses the saved model; --test is scored
    once, on that saved model, at the end. `on_eval(step, scores)` sees each evaluation (a search prunes
    trials through it by raising).
    """
    run = _start(args, resume, overwrite, group)
    group, position, task = run.group, run.position, run.data.task
    steps_per_epoch = math.ceil(len(run.data.items) / (args.batch_size * run.parts))
    eval_every = args.eval_every or steps_per_epoch
    metric = args.metric or task.metric
    best = BestModel(lambda: run.evaluate(run.data.eval_items), lambda: run.adapted.save(model_dir(run.run_dir)), metric,
                     metric in ("accuracy", "macro_f1"), eval_every, args.early_stop, on_eval)
    checkpoints = Checkpoints(lambda p: save_checkpoint(run.run_dir, run.model, run.optimizer, run.scheduler, p,
                                                        args.keep_checkpoints), args.save_every or eval_every)
    lengths = [task.length(item) for item in run.data.items]
    started, tokens, last_loss, scores, stopped = time.perf_counter(), 0, float("nan"), {}, False
    progress = _progress(console if group.is_main else None, run.total)
    bar = progress.add_task("train", total=run.total, completed=position.step, loss=0.0, lr=0.0, tps=0.0)
    with progress:
        while position.step < run.total and not stopped:
            batches = epoch_batches(lengths, args.batch_size * run.parts, args.seed, position.epoch, by_length=True)
            for global_items in batches[position.batch_in_epoch :]:
                micro = [task.collate(run.data.items, chunk, position.epoch, group.device)
                         for chunk in split_batch(global_items, run.parts)[group.rank :: group.world] if chunk]
                lr = run.optimizer.param_groups[0]["lr"]
                last_loss = _optimizer_step(run, micro)
                step_tokens = _global_count(sum(b.num_tokens for b in micro), group)
                tokens += step_tokens
                elapsed = time.perf_counter() - started
                if run.log is not None:
                    run.log.write({"step": position.step, "epoch": position.epoch + 1, "loss": last_loss, "lr": lr,
                                   "tokens": step_tokens, "tokens_per_s": tokens / elapsed, "elapsed_s": elapsed}, "train")
                progress.update(bar, completed=position.step, loss=last_loss, lr=lr, tps=tokens / elapsed)
                final = position.step >= run.total
                if run.data.eval_items is not None and best.due(position.step, final):
                    scores, stop = best(position, run.log) if group.is_main else (scores, False)
                    stopped = distributed.broadcast_flag(stop, group)
                if group.is_main:
                    checkpoints(position, final or stopped)
                if final or stopped:
                    break
            else:
                position.epoch += 1
                position.batch_in_epoch = 0
    test_scores, old_after = _finish(run)
    seconds = time.perf_counter() - started
    return TrainResult(run.run_dir, position.step, last_loss, scores, test_scores, position.best, position.best_step,
                       stopped, seconds, tokens / seconds if seconds else 0.0, sum(p.numel() for p in run.trainable),
                       run.old_before, old_after)


def _start(args: TrainArgs, resume: bool, overwrite: bool, group: ProcessGroup | None) -> Run:
    """Check, read and build everything before the first step, in the order that keeps a resumed run exact."""
    args.check()
    group = group if group is not None else distributed.init(resolve_device(args.device))
    run_dir = Path(args.output)
    _check_run_dir(args, resume, overwrite)
    torch.manual_seed(args.seed)
    if args.init_from is not None:
        from lmkernel.train.continual import OldTask

        OldTask.settings(Path(args.init_from), args.task)  # a clear error before any model loads
    loaded = load_model(args.model, device="cpu", quantization=None)  # training updates float weights
    if args.task == "classify" and not loaded.config.is_encoder and args.peft is None and args.lora is None:
        args = replace(args, lora="")  # a decoder classifier: LoRA (default settings) unless --peft full or another
    data = read_data(args, choose_task(args, loaded))
    if group.is_main and not resume:
        if overwrite and (run_dir / RUN_FILE).is_file():
            shutil.rmtree(run_dir)
        write_settings(run_dir, args.to_dict())
    distributed.barrier(group)
    adapted = adapt(args, data.task, loaded, len(data.items), group.world)
    model = adapted.model
    model.checkpoint_layers = args.checkpointing
    model.to(group.device).train()
    attack = None
    if args.adversarial is not None:
        from lmkernel.train.adversarial import EmbeddingAttack

        attack = EmbeddingAttack(model, adapted.config.vocab_size, args.adversarial, args.adv_epsilon, args.adv_steps)
    penalties = list(adapted.penalties)
    if data.old is not None and args.ewc > 0:
        from lmkernel.train.continual import ElasticWeights

        penalties.append(ElasticWeights(model, data.task, data.old.train_items, args.ewc, args.seed, group.device).penalty)
    total = args.max_steps or args.num_epochs * math.ceil(len(data.items) / (args.batch_size * group.world * args.grad_accum))
    warmup = int(args.warmup) if args.warmup >= 1 else round(args.warmup * total)  # --max-steps overrides --epochs
    optimizer = build_optimizer(args.optimizer, model, args.peak_lr, args.weight_decay)
    scheduler = build_schedule(optimizer, args.schedule, warmup, total)
    checkpoint = latest_checkpoint(run_dir) if resume else None
    position = load_checkpoint(checkpoint, model, optimizer, scheduler) if checkpoint is not None else Position()
    log = MetricsLog(run_dir, position.step if resume else None) if group.is_main else None
    run = Run(args, group, run_dir, loaded, data, adapted, penalties, attack,
              [p for p in model.parameters() if p.requires_grad], optimizer, scheduler, position, log, total)
    if data.old is not None and group.is_main and not resume:
        run.old_before = run.evaluate(data.old.eval_items)
    return run


def _optimizer_step(run: Run, micro: list[Any]) -> float:
    """One optimizer step over this process's micro-batches: the penalties, the (adversarial) backward passes,
    gradients summed across processes, clipping; the step's loss (the clean pass's), or a TrainingError."""
    group, position = run.group, run.position
    count = _global_count(sum(b.num_targets for b in micro), group)
    loss_sum = torch.zeros((), device=group.device)

    def backward(scored: bool = False) -> None:
        nonlocal loss_sum
        for batch in micro:
            with torch.autocast(group.device.type, torch.bfloat16, enabled=run.args.bf16):
                part = run.data.task.loss_sum(run.model, batch)
            (part / count).backward()
            if scored:
                loss_sum += part.detach().float()

    for penalty in run.penalties:  # AdaLoRA's orthogonality, EWC: once per step (the processes' sum)
        if (extra := penalty()) is not None:
            (extra / group.world).backward()
    if run.attack is None:
        backward(scored=True)
    else:  # the reported loss is the clean pass's
        calls = iter([True])
        run.attack.step(lambda: backward(scored=next(calls, False)), run.trainable)
    loss = float(distributed.all_reduce_gradients(run.model, loss_sum / count, group))
    if not math.isfinite(loss):
        if run.log is not None:
            run.log.close()
        done = latest_checkpoint(run.run_dir)
        kept = f"the last good checkpoint is {done}" if done else "no checkpoint had been written yet"
        raise TrainingError(f"the loss became {loss} at step {position.step + 1} (epoch {position.epoch + 1}); "
                            f"the run stopped; {kept}. Try a lower --lr or --clip.")
    if run.args.clip > 0:
        torch.nn.utils.clip_grad_norm_(run.trainable, run.args.clip)
    run.optimizer.step()
    run.scheduler.step()
    run.adapted.after_step(position.step + 1)
    run.optimizer.zero_grad(set_to_none=True)
    position.step += 1
    position.batch_in_epoch += 1
    return loss


def _finish(run: Run) -> tuple[dict[str, float], dict[str, float]]:
    """After the last step: the model saved (when no evaluation chose it), --test scored once on it, and the
    old task (--init-from) scored on it; (test scores, old task's scores after)."""
    args, task, device = run.args, run.data.task, run.group.device
    if run.attack is not None:
        run.attack.close()
    test_scores: dict[str, float] = {}
    old_after: dict[str, float] = {}
    if run.group.is_main:
        if run.data.eval_items is None:
            run.adapted.save(model_dir(run.run_dir))
        if run.data.test_items is not None:
            test_scores = _score_saved_model(task, run.run_dir, run.data.test_items, args.batch_size * 2, device)
        elif args.task == "multi":
            test_scores = task.score_saved(model_dir(run.run_dir), args.batch_size * 2, device)
        if test_scores:
            run.log.write({"step": run.position.step, "split": "test", **test_scores}, "test")
        if run.data.old is not None:
            old_after = _score_saved_model(task, run.run_dir, run.data.old.eval_items, args.batch_size * 2, device)
            if run.old_before:
                run.log.write({"step": 0, "split": "old", "when": "before", **run.old_before}, "old")
            run.log.write({"step": run.position.step, "split": "old", "when": "after", **old_after}, "old")
        run.log.close()
    distributed.barrier(run.group)
    return test_scores, old_after

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
