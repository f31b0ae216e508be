"""`lmk train` and `lmk lora merge`: fine-tuning runs and their adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmkernel.cli import Opt, app, console, fail
from lmkernel.errors import LmkError


@app.command()
def train(
    config: Annotated[Path | None, typer.Argument(help="a YAML file of settings, keys as the flags (eval, batch_size...)")] = None,
    task: Annotated[str | None, Opt(help="clm (chat JSONL or text), mlm (BERT), classify (text + label) or multi (a YAML of tasks)")] = None,
    model: Annotated[str | None, Opt(help="alias, Hugging Face directory, .gguf file or run directory (--init-from sets it)")] = None,
    data: Annotated[str | None, Opt(help="training data: .jsonl, .csv or .txt")] = None,
    eval: Annotated[str | None, Opt("--eval", help="validation data, same format: chooses the best evaluation")] = None,
    holdout: Annotated[float | None, Opt(help="instead of --eval: hold out this fraction of --data (per label) to choose on")] = None,
    test: Annotated[str | None, Opt("--test", help="scored once, on the saved model at the end (never used to choose)")] = None,
    output: Annotated[str | None, Opt("-o", "--output", help="the run directory")] = None,
    lora: Annotated[str | None, Opt(help="train a LoRA adapter, e.g. r=8,alpha=16 (default: full fine-tuning)")] = None,
    peft: Annotated[str | None, Opt(help="lora, adalora, ia3, prompt, prefix, adapter (bottleneck) or full: the method")] = None,
    peft_args: Annotated[str | None, Opt(help="the method's settings, e.g. r=12,target_r=8 (adalora), tokens=20 (prompt), "
                                             "size=64 (adapter)")] = None,
    epochs: Annotated[int | None, Opt(help="passes over the data (default 5 full, 3 LoRA)")] = None,
    max_steps: Annotated[int | None, Opt(help="optimizer steps to run (overrides --epochs)")] = None,
    lr: Annotated[float | None, Opt(help="peak learning rate (default 1e-4 full, 5e-4 LoRA)")] = None,
    batch_size: Annotated[int | None, Opt(help="examples per process and micro-batch (default 16)")] = None,
    grad_accum: Annotated[int | None, Opt(help="micro-batches per optimizer step")] = None,
    max_length: Annotated[int | None, Opt(help="tokens per sequence (clm: per packed row)")] = None,
    schedule: Annotated[str | None, Opt(help="constant, linear or cosine, after warm-up")] = None,
    warmup: Annotated[float | None, Opt(help="warm-up: a fraction of the steps (<1) or a step count")] = None,
    optimizer: Annotated[str | None, Opt(help="adamw, sgd or adafactor")] = None,
    weight_decay: Annotated[float | None, Opt()] = None,
    clip: Annotated[float | None, Opt(help="gradient-norm clipping (0: off)")] = None,
    bf16: Annotated[bool | None, Opt("--bf16/--no-bf16", help="bfloat16 autocast")] = None,
    checkpointing: Annotated[bool | None, Opt("--checkpointing/--no-checkpointing",
                                              help="activation checkpointing (default on: far less memory)")] = None,
    dropout: Annotated[float | None, Opt(help="override the model's dropout")] = None,
    early_stop: Annotated[int | None, Opt(help="patience: evaluations without gain before stopping")] = None,
    metric: Annotated[str | None, Opt(help="validation metric to follow: loss, perplexity, accuracy, macro_f1")] = None,
    eval_every: Annotated[int | None, Opt(help="steps between evaluations (default: each epoch)")] = None,
    save_every: Annotated[int | None, Opt(help="steps between checkpoints (default: at each evaluation)")] = None,
    keep_checkpoints: Annotated[int | None, Opt()] = None,
    augment: Annotated[int | None, Opt(help="classify: augmented copies per sentence (deletion, swap, mixing)")] = None,
    adversarial: Annotated[str | None, Opt(help="fgm or pgd: also train on embeddings perturbed against the loss")] = None,
    adv_epsilon: Annotated[float | None, Opt(help="the perturbation's L2 radius (default 1.0)")] = None,
    adv_steps: Annotated[int | None, Opt(help="pgd: ascent steps (default 3)")] = None,
    init_from: Annotated[str | None, Opt(help="continual learning: start from this run's model and measure its old task")] = None,
    replay: Annotated[float | None, Opt(help="with --init-from: mix in this fraction of the old run's training data")] = None,
    ewc: Annotated[float | None, Opt(help="with --init-from: elastic weight consolidation strength (e.g. 1e4)")] = None,
    seed: Annotated[int | None, Opt()] = None,
    device: Annotated[str | None, Opt(help="auto, cpu or cuda")] = None,
    resume: Annotated[bool, Opt(help="continue the run in --output from its last checkpoint")] = False,
    overwrite: Annotated[bool, Opt(help="replace an existing run directory")] = False,
) -> None:
    """Fine-tune a model (full, LoRA or another --peft method) into a run directory; `torchrun ... -m lmkernel.train` for several processes."""
    given = {k: v for k, v in locals().items() if v is not None and k not in ("config", "resume", "overwrite")}
    _run_training(config, given, resume, overwrite)


def _run_training(config: Path | None, given: dict[str, object], resume: bool, overwrite: bool) -> None:
    """`lmk train` once its flags are read: settings from --config, or from the run being resumed, with the flags
    given on the command line over them; then the run, and its summary from the main process."""
    from lmkernel.loading import resolve_device
    from lmkernel.train import distributed
    from lmkernel.train.args import TrainArgs, read_yaml
    from lmkernel.train.checkpoint import read_settings
    from lmkernel.train.trainer import summary_table, train as run

    output = given.get("output")
    flags = {{"eval": "eval_data", "test": "test_data"}.get(k, k): v for k, v in given.items()}
    try:
        values: dict[str, object] = {}
        source = "the command line"
        if resume and output is not None and config is None:
            values, source = read_settings(Path(output)), f"{output}/run.json"
        if config is not None:
            values, source = read_yaml(config), str(config)
        values.update(flags)
        args = TrainArgs.from_mapping(values, source).check()
        group = distributed.init(resolve_device(args.device))
        result = run(args, resume=resume, overwrite=overwrite, console=console, group=group)
    except LmkError as exc:
        raise fail(exc) from None
    if group.is_main:
        console.print(summary_table(result, args.metric or ("accuracy" if args.task in ("classify", "multi") else "loss")))
    distributed.shutdown(group)


@app.command()
def tune(
    config: Annotated[Path, typer.Argument(help="a YAML file: `lmk train` settings (with holdout or eval to choose on, "
                                                "test_data to report on) and an optional search: section of ranges")],
    trials: Annotated[int, Opt(help="trials the study should hold; a rerun resumes and adds the missing ones")] = 20,
    final: Annotated[bool, Opt("--final/--no-final", help="train the final model with the best settings")] = True,
    ray: Annotated[bool, Opt("--ray", help="run the trials on Ray Tune (same search space, median stopping)")] = False,
    ray_address: Annotated[str | None, Opt(help="with --ray: join this cluster ('auto', HOST:PORT, ray://...)")] = None,
    cpus_per_trial: Annotated[float, Opt(help="with --ray: CPUs (and torch threads) per trial")] = 1.0,
) -> None:
    """Search learning rate, batch size, epochs, warm-up and LoRA rank with Optuna (TPE, median pruning) on
    the selection split; write every trial, the best settings, and the final model trained with them."""
    from lmkernel.train.args import TrainArgs, read_yaml
    from lmkernel.train.trainer import summary_table
    from lmkernel.train.tune import RayOptions, SearchSpace, tune as run

    try:
        values = read_yaml(config)
        search = values.pop("search", None) or {}
        if not isinstance(search, dict):
            raise LmkError(f"{config}: search must be a mapping of ranges (lr: [low, high], ...)")
        space = SearchSpace.from_mapping(search, str(config))
        if cpus_per_trial <= 0:
            raise LmkError(f"--cpus-per-trial must be positive; got {cpus_per_trial}")
        options = RayOptions(ray_address, cpus_per_trial) if ray or ray_address else None
        result = run(TrainArgs.from_mapping(values, str(config)), space, trials, console=console, train_final=final,
                     ray=options)
    except LmkError as exc:
        raise fail(exc) from None
    console.print(f"best {result.metric} {result.best_value:.4f} with {result.best_params} "
                  f"({len(result.trials)} trials; {result.tune_dir}/trials.jsonl, best.json)")
    if result.final is not None:
        console.print(summary_table(result.final, result.metric))
        if result.final.test_metrics:
            console.print("final model on test_data: " + ", ".join(f"{k} {v:.4f}" for k, v in result.final.test_metrics.items()))


@app.command()
def ensemble(
    members: Annotated[list[str], typer.Argument(help="two or more fine-tuned classifiers: run or model directories")],
    output: Annotated[Path, Opt("-o", "--output", help="the ensemble directory to write")],
    overwrite: Annotated[bool, Opt(help="replace an existing output directory")] = False,
) -> None:
    """One model directory whose predictions average the MEMBERS' probabilities (same labels and tokenizer)."""
    from lmkernel.train.ensemble import make_ensemble

    try:
        out = make_ensemble(members, output, overwrite)
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
    console.print(f"ensemble of {len(members)} members: wrote {out} (LLM, lmk eval classify and lmk serve load it)")


lora_app = typer.Typer(help="LoRA adapters in the PEFT format (train them with `lmk train --lora`).", no_args_is_help=True)
app.add_typer(lora_app, name="lora")


@lora_app.command("merge")
def lora_merge(
    base: Annotated[str, typer.Argument(help="the base model: alias, Hugging Face directory or .gguf file")],
    adapter: Annotated[Path, typer.Argument(help="a PEFT LoRA, AdaLoRA or IA3 adapter directory (adapter_config.json + adapter_model.safetensors)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="directory to write")],
    overwrite: Annotated[bool, typer.Option(help="replace an existing output directory")] = False,
) -> None:
    """Fold ADAPTER into BASE and write a Hugging Face directory (float32) that lmkernel and transformers load;
    a classification adapter gives a sequence-classification model with its labels."""
    from lmkernel.train.lora import merge_adapter_dir

    try:
        out = merge_adapter_dir(base, adapter, output, overwrite)
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
    console.print(f"merged {adapter} into {base}; wrote {out}")
