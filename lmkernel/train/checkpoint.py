"""A run directory and its checkpoints.

    RUN_DIR/run.json            the settings (a resumed run must use the same)
    RUN_DIR/metrics.jsonl       one line per optimizer step and per evaluation
    RUN_DIR/tensorboard/        TensorBoard event files
    RUN_DIR/checkpoints/step-N/ trainable weights, optimizer, scheduler, RNG states, data position
    RUN_DIR/model/              the best (or final) model: a Hugging Face directory, or a PEFT adapter

A checkpoint is written to a temporary directory and renamed into place, then `latest` is pointed at
it (also by rename), so a crash while saving leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import json
import os
import pickle  # nosec B403  # only for its error type: state.pt loads with weights_only
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmkernel.errors import LmkError
from lmkernel.registry import RUN_FILE, RUN_MODEL_DIR

CHECKPOINTS = "checkpoints"
LATEST = "latest"
METRICS = "metrics.jsonl"


@dataclass
class Position:
    """Where training stands: optimizer steps done, the epoch and the batch within it, and the
    early-stopping record."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best: float | None = None
    best_step: int = 0
    evals_without_gain: int = 0


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def model_dir(run_dir: Path) -> Path:
    return run_dir / RUN_MODEL_DIR


def write_settings(run_dir: Path, settings: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / RUN_FILE, json.dumps(settings, indent=2))


def read_settings(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise LmkError(f"--resume: {run_dir} is not a training run (no {RUN_FILE}); start it without --resume")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LmkError(f"{path}: unreadable ({exc})") from None


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (all of them, or a LoRA run's adapters and new heads)."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, position: Position, keep: int) -> Path:
    """Write checkpoint step-N whole or not at all, point `latest` at it, keep the newest `keep`."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{position.step:08d}"
    for stale in root.glob(".*step-*"):  # what a killed save or delete left (one writer: none is in use)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng},
                   tmp / "state.pt")
        (tmp / "position.json").write_text(json.dumps(asdict(position)))
        for f in tmp.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():
            _discard(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_atomic(root / LATEST, final.name)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        _discard(old)
    return final


def _discard(checkpoint: Path) -> None:
    """Delete a checkpoint so that a kill at any moment leaves it whole or gone: one atomic rename off its final
    name, then the files."""
    trash = checkpoint.with_name(f".discarded.{checkpoint.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(checkpoint, trash)
    shutil.rmtree(trash, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest` names, else the newest complete one, else None."""
    root = run_dir / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text(encoding="utf-8").strip()
        if (named / "position.json").is_file():
            return named
    done = sorted(p for p in root.glob("step-*") if (p / "position.json").is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler) -> Position:
    """Restore weights, optimizer, scheduler and RNG states from `path`; return the data position."""
    try:
        weights = load_file(str(path / "trainable.safetensors"))
        state = torch.load(path / "state.pt", weights_only=True)  # tensors and plain values only: no pickled code
        position = Position(**json.loads((path / "position.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, RuntimeError, TypeError, pickle.UnpicklingError) as exc:
        raise LmkError(f"{path}: checkpoint cannot be read ({exc})") from None
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != expected:
        raise LmkError(f"{path}: checkpoint holds other parameters than this run trains "
                       f"({len(weights)} saved, {len(expected)} expected); was the run started with other settings?")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return position


class MetricsLog:
    """metrics.jsonl plus TensorBoard scalars; on resume, lines past the checkpoint are dropped."""

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        from tensorboardX import SummaryWriter

        self.path = run_dir / METRICS
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            write_atomic(self.path, "".join(f"{line}\n" for line in kept))
        self.file = open(self.path, "a", encoding="utf-8")
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1)

    def write(self, record: dict[str, Any], prefix: str) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        self.file.close()
        self.writer.close()
