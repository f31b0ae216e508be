"""Checkpoints: written whole or not at all, restored exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lmkernel.train import checkpoint
from lmkernel.train.checkpoint import Position, latest_checkpoint, load_checkpoint, save_checkpoint


def _setup() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    model = nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))


def _step(model: nn.Module, opt: torch.optim.Optimizer, sched) -> None:
    model(torch.randn(3, 4)).pow(2).sum().backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_a_crash_while_saving_leaves_the_previous_checkpoint_intact(tmp_path: Path, monkeypatch):
    model, opt, sched = _setup()
    _step(model, opt, sched)
    first = save_checkpoint(tmp_path, model, opt, sched, Position(step=1), keep=2)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, opt, sched)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(tmp_path, model, opt, sched, Position(step=2), keep=2)
    monkeypatch.undo()
    root = tmp_path / checkpoint.CHECKPOINTS
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001"]  # no half-written step 2
    assert latest_checkpoint(tmp_path) == first
    fresh, fresh_opt, fresh_sched = _setup()
    position = load_checkpoint(first, fresh, fresh_opt, fresh_sched)
    assert position.step == 1 and fresh_sched.last_epoch == 1
    for name, tensor in fresh.state_dict().items():
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0)


def test_resuming_restores_the_random_state_and_keeps_only_the_newest(tmp_path: Path):
    model, opt, sched = _setup()
    for step in range(1, 4):
        _step(model, opt, sched)
        save_checkpoint(tmp_path, model, opt, sched, Position(step=step), keep=2)
    expected = torch.rand(5)
    assert sorted(p.name for p in (tmp_path / checkpoint.CHECKPOINTS).glob("step-*")) == ["step-00000002", "step-00000003"]
    torch.rand(100)
    load_checkpoint(latest_checkpoint(tmp_path), *_setup())
    torch.testing.assert_close(torch.rand(5), expected, rtol=0, atol=0)


@pytest.mark.parametrize("replaced", [False, True], ids=["old-one-rotated-out", "same-step-written-again"])
def test_a_kill_while_a_checkpoint_is_deleted_leaves_none_incomplete_under_its_name(tmp_path: Path, monkeypatch, replaced):
    """The deletion of a checkpoint (the oldest rotated out, or a step written again) killed after its first file:
    every `step-*` left is whole, and the next save still works."""
    model, opt, sched = _setup()
    for step in (1, 2):
        _step(model, opt, sched)
        save_checkpoint(tmp_path, model, opt, sched, Position(step=step), keep=2)
    real_rmtree = checkpoint.shutil.rmtree

    def killed_after_one_file(path, ignore_errors=False):
        path = Path(path)
        if path.is_dir() and any(path.iterdir()):
            next(path.iterdir()).unlink()
            raise KeyboardInterrupt  # a signal landing mid-delete
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_after_one_file)
    _step(model, opt, sched)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, model, opt, sched, Position(step=2 if replaced else 3), keep=2)
    monkeypatch.undo()
    root = tmp_path / checkpoint.CHECKPOINTS
    whole = {"trainable.safetensors", "state.pt", "position.json"}
    left = {p.name: {f.name for f in p.iterdir()} for p in root.glob("step-*")}
    assert all(files == whole for files in left.values()), left
    assert set(left) == ({"step-00000001"} if replaced else {"step-00000002", "step-00000003"})
    position = load_checkpoint(latest_checkpoint(tmp_path), *_setup())
    assert position.step == (1 if replaced else 3)
    assert any(p.name.startswith(".") for p in root.iterdir())  # the half-deleted remains, off the final names
    save_checkpoint(tmp_path, model, opt, sched, Position(step=4), keep=2)
    assert sorted(p.name for p in root.iterdir()) == (["latest", "step-00000001", "step-00000004"] if replaced
                                                      else ["latest", "step-00000003", "step-00000004"])
