"""`lmk tune`: hyperparameter search over `lmk train` runs with Optuna.

TPE proposes each trial's learning rate, batch size, epochs, warm-up and (for LoRA runs) rank; every
trial reports its selection metric at each evaluation and the median pruner stops trials that fall
behind. Trials see only the selection split (`--holdout` of the training data, or `eval`); a `test_data`
file is scored once, on the final model trained with the best settings, so the reported figure is not
the one that chose them. The study lives in `study.db` (SQLite) in the tune directory: running the same
command again resumes an interrupted search and runs only the trials still missing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from lmkernel.errors import LmkError
from lmkernel.train.args import TrainArgs
from lmkernel.train.checkpoint import write_atomic
from lmkernel.train.trainer import TrainResult, train

STUDY_FILE = "study.db"
TRIALS_FILE = "trials.jsonl"
BEST_FILE = "best.json"


@dataclass(frozen=True)
class SearchSpace:
    """The ranges TPE draws from: a log-uniform learning rate, batch sizes, epochs, warm-up fraction, LoRA ranks."""

    lr: tuple[float, float] = (1e-5, 1e-3)
    batch_size: tuple[int, ...] = (8, 16, 32)
    epochs: tuple[int, int] = (1, 5)
    warmup: tuple[float, float] = (0.0, 0.2)
    lora_r: tuple[int, ...] = (4, 8, 16)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str) -> SearchSpace:
        """A YAML `search:` section: lr [low, high], batch_size [choices], epochs [low, high], warmup [low, high],
        lora_r [choices]; anything left out keeps its default range."""
        fields = {f.name for f in dataclasses.fields(cls)}
        out: dict[str, tuple[Any, ...]] = {}
        for key, value in values.items():
            if key not in fields:
                raise LmkError(f"{source}: search.{key} is not searched; expected some of {', '.join(sorted(fields))}")
            if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, (int, float)) for v in value):
                raise LmkError(f"{source}: search.{key} must be a list of numbers; got {value!r}")
            out[key] = tuple(value)
        space = cls(**out)
        for key in ("lr", "epochs", "warmup"):
            low_high = getattr(space, key)
            if len(low_high) != 2 or not 0 <= low_high[0] <= low_high[1]:
                raise LmkError(f"{source}: search.{key} must be [low, high] with 0 <= low <= high; got {list(low_high)}")
        if space.lr[0] <= 0 or space.epochs[0] < 1 or space.warmup[1] >= 1:
            raise LmkError(f"{source}: search ranges need lr > 0, epochs >= 1 and warmup < 1")
        for key in ("batch_size", "lora_r"):
            if any(not isinstance(v, int) or v < 1 for v in getattr(space, key)):
                raise LmkError(f"{source}: search.{key} must list whole numbers >= 1")
        return space

    def suggest(self, trial: Any, lora: bool) -> dict[str, Any]:
        """One trial's settings, drawn by the study's sampler."""
        params: dict[str, Any] = {
            "lr": trial.suggest_float("lr", *self.lr, log=True),
            "batch_size": trial.suggest_categorical("batch_size", list(self.batch_size)),
            "epochs": trial.suggest_int("epochs", *(int(e) for e in self.epochs)),
            "warmup": trial.suggest_float("warmup", *self.warmup),
        }
        if lora:
            params["lora_r"] = trial.suggest_categorical("lora_r", list(self.lora_r))
        return params


@dataclass
class TuneResult:
    """The search's outcome: every trial, the best settings and their selection score, and the final run."""

    tune_dir: Path
    metric: str
    trials: list[dict[str, Any]]
    best_params: dict[str, Any]
    best_value: float
    final: TrainResult | None


def with_rank(spec: str, r: int) -> str:
    """A LoRA spec ("r=8,alpha=16,...") with its rank replaced (or set)."""
    if re.search(r"(^|,)\s*r\s*=", spec):
        return re.sub(r"(^|,)(\s*)r\s*=\s*[^,]*", lambda m: f"{m.group(1)}{m.group(2)}r={r}", spec, count=1)
    return f"r={r}" + (f",{spec}" if spec.strip() else "")


def trial_args(base: TrainArgs, params: Mapping[str, Any], output: Path) -> TrainArgs:
    """The run a trial (or the final model) trains: the base settings with the drawn ones; never the test data."""
    drawn = {k: v for k, v in params.items() if k != "lora_r"}
    lora = with_rank(base.lora, int(params["lora_r"])) if base.lora is not None and "lora_r" in params else base.lora
    return dataclasses.replace(base, **drawn, lora=lora, output=str(output), test_data=None, max_steps=base.max_steps)


def tune(base: TrainArgs, space: SearchSpace, trials: int, console: Console | None = None,
         train_final: bool = True, ray: RayOptions | None = None) -> TuneResult:
    """Run the search until the study holds `trials` finished trials, then (with `train_final`) train the
    final model with the best settings into TUNE_DIR/final, scoring `base.test_data` on it once. With `ray`,
    the trials run on Ray Tune (same search space and sampler, median stopping) instead of in this process."""
    try:
        import optuna
        from optuna.trial import TrialState
    except ImportError:
        raise LmkError("lmk tune needs Optuna: pip install 'lmkernel[tune]'") from None
    _check_request(base, trials)
    tune_dir = Path(base.output)
    tune_dir.mkdir(parents=True, exist_ok=True)
    metric = base.metric or ("accuracy" if base.task == "classify" else "loss")
    maximize = metric in ("accuracy", "macro_f1")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if ray is not None:
        records, best_params, best_value = _tune_on_ray(base, space, trials, metric, maximize, ray)
        _write_lines(tune_dir / TRIALS_FILE, records)
        return _finish(base, tune_dir, metric, records, best_params, best_value, None, train_final, console)
    study = _open_study(base, tune_dir, maximize, trials)
    remaining = trials - len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    if remaining > 0:
        study.optimize(_objective(base, space, tune_dir, metric, console), n_trials=remaining, catch=(LmkError,))
    records = [_record(t) for t in study.get_trials(deepcopy=False)]
    _write_lines(tune_dir / TRIALS_FILE, records)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise LmkError(f"{tune_dir}: no trial finished (see {TRIALS_FILE})")
    best = study.best_trial
    return _finish(base, tune_dir, metric, records, dict(best.params), float(best.value), best.number, train_final,
                   console)


def _check_request(base: TrainArgs, trials: int) -> None:
    """The settings checked, and a search refused that has no selection split to choose on or no trial to run."""
    base.check()
    if base.eval_data is None and base.holdout == 0:
        raise LmkError("lmk tune chooses settings on a selection split: give eval (a file) or holdout (a fraction of "
                       "data); test_data is scored only on the final model")
    if trials < 1:
        raise LmkError(f"--trials must be at least 1; got {trials}")


def _open_study(base: TrainArgs, tune_dir: Path, maximize: bool, trials: int) -> Any:
    """The study in TUNE_DIR/study.db, created or resumed; a trial an interrupted run left running is marked failed."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.create_study(
        study_name="lmk-tune", storage=f"sqlite:///{tune_dir / STUDY_FILE}", load_if_exists=True,
        direction="maximize" if maximize else "minimize",
        sampler=optuna.samplers.TPESampler(seed=base.seed, n_startup_trials=min(5, trials)),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
    )
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # an interrupted run's trial
        study.tell(stale.number, state=TrialState.FAIL)
    return study


def _objective(base: TrainArgs, space: SearchSpace, tune_dir: Path, metric: str,
               console: Console | None) -> Callable[[Any], float]:
    """Optuna's objective: one trial's run with the settings it draws, reporting each evaluation so the median
    pruner can stop it early."""
    import optuna

    def objective(trial: Any) -> float:
        params = space.suggest(trial, lora=base.lora is not None)
        args = trial_args(base, params, tune_dir / "trials" / f"{trial.number:03d}")

        def report(step: int, scores: Mapping[str, float]) -> None:
            trial.report(scores[metric], step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{metric} {scores[metric]:.4f} at step {step}: below the median of earlier trials")

        result = train(args, overwrite=True, on_eval=report)
        if result.best is None or not math.isfinite(result.best):
            raise LmkError(f"trial {trial.number} gave no {metric}")
        if console is not None:
            console.print(f"trial {trial.number}: {metric} {result.best:.4f} with {params}")
        return result.best

    return objective


def _finish(base: TrainArgs, tune_dir: Path, metric: str, records: list[dict[str, Any]], params: dict[str, Any],
            value: float, number: int | None, train_final: bool, console: Console | None) -> TuneResult:
    """best.json, then the final model trained with the best settings (scored once on the test data)."""
    write_atomic(tune_dir / BEST_FILE, json.dumps({"metric": metric, "value": value, "trial": number,
                                                   "params": params}, indent=2) + "\n")
    final = None
    if train_final:
        final_args = dataclasses.replace(trial_args(base, params, tune_dir / "final"), test_data=base.test_data)
        final = train(final_args, overwrite=True, console=console)
    return TuneResult(tune_dir, metric, records, params, value, final)


@dataclass(frozen=True)
class _DefineByRun:
    """`SearchSpace.suggest` as the define-by-run space Ray's OptunaSearch takes (picklable: it saves its state)."""

    space: SearchSpace
    lora: bool

    def __call__(self, trial: Any) -> None:
        self.space.suggest(trial, self.lora)


@dataclass(frozen=True)
class RayOptions:
    """Where the trials run: a local Ray (address None) or a cluster ("auto", "HOST:PORT", "ray://..."), and
    the CPUs each trial takes (also its torch threads)."""

    address: str | None = None
    cpus_per_trial: float = 1.0


def _tune_on_ray(base: TrainArgs, space: SearchSpace, trials: int, metric: str, maximize: bool,
                 options: RayOptions) -> tuple[list[dict[str, Any]], dict[str, Any], float]:
    """The same search on Ray Tune: Optuna's TPE (define-by-run, the same `SearchSpace.suggest`) proposes,
    the median stopping rule prunes, each trial a Ray task training with `train`. An experiment found in
    TUNE_DIR/ray is restored and continued rather than started again."""
    try:
        import ray
        from ray import tune as ray_tune
        from ray.tune.schedulers import MedianStoppingRule
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as exc:
        raise LmkError(f"lmk tune --ray needs Ray Tune: pip install 'lmkernel[ray]' ({exc.name} is missing)") from None
    tune_dir = Path(base.output).resolve()
    mode = "max" if maximize else "min"
    threads = max(1, int(options.cpus_per_trial))

    def trainable(config: dict[str, Any]) -> None:
        import torch

        torch.set_num_threads(threads)
        trial_dir = tune_dir / "trials" / ray_tune.get_context().get_trial_id()
        args = trial_args(base, config, trial_dir)
        train(args, overwrite=True, on_eval=lambda step, scores: ray_tune.report({metric: scores[metric], "step": step}))

    ray.init(address=options.address, ignore_reinit_error=True, log_to_driver=False,
             include_dashboard=False, configure_logging=False)
    try:
        runnable = ray_tune.with_resources(trainable, {"cpu": options.cpus_per_trial})
        path = tune_dir / "ray" / "lmk-tune"
        if ray_tune.Tuner.can_restore(str(path)):
            tuner = ray_tune.Tuner.restore(str(path), runnable, resume_errored=True)
        else:
            tuner = ray_tune.Tuner(
                runnable,
                tune_config=ray_tune.TuneConfig(
                    search_alg=OptunaSearch(space=_DefineByRun(space, base.lora is not None), metric=metric, mode=mode, seed=base.seed),
                    scheduler=MedianStoppingRule(time_attr="step", metric=metric, mode=mode, min_samples_required=2),
                    num_samples=trials, max_concurrent_trials=max(1, int(ray.available_resources().get("CPU", 1)
                                                                        // options.cpus_per_trial)),
                ),
                run_config=ray_tune.RunConfig(name="lmk-tune", storage_path=str(tune_dir / "ray"), verbose=0),
            )
        grid = tuner.fit()
    finally:
        ray.shutdown()
    records = []
    for i, result in enumerate(grid):
        history = result.metrics_dataframe
        evaluations = {} if history is None else {str(int(s)): float(v) for s, v in zip(history["step"], history[metric])}
        value = None if history is None or not len(history) else float(
            history[metric].max() if maximize else history[metric].min())
        records.append({"trial": i, "state": "error" if result.error else "complete", "value": value,
                        "params": dict(result.config), "evaluations": evaluations, "seconds": None})
    done = [r for r in records if r["value"] is not None]
    if not done:
        raise LmkError(f"{tune_dir}: no Ray Tune trial finished (see {tune_dir / 'ray'})")
    best = (max if maximize else min)(done, key=lambda r: r["value"])
    return records, best["params"], best["value"]


def _record(trial: Any) -> dict[str, Any]:
    seconds = trial.duration.total_seconds() if trial.duration is not None else None
    return {"trial": trial.number, "state": trial.state.name.lower(), "value": trial.value, "params": trial.params,
            "evaluations": {str(k): v for k, v in sorted(trial.intermediate_values.items())}, "seconds": seconds}


def _write_lines(path: Path, records: list[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))

