"""`TrainArgs` (lmkernel/train/args.py): each setting checked with the flag it names, the task's and the
method's defaults, settings read from a mapping (YAML keys, CLI spellings) and a YAML file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lmkernel.errors import LmkError
from lmkernel.train.args import TrainArgs, read_yaml

BASE = dict(task="classify", model="m", data="d", output="o")


def test_peft_flags_are_checked_before_anything_loads(tmp_path):
    base = {"task": "classify", "model": "all-minilm-l6-v2", "data": str(tmp_path / "train.jsonl"),
            "output": str(tmp_path / "x")}
    with pytest.raises(LmkError, match="--peft 'bitfit'"):
        TrainArgs(**base, peft="bitfit").check()
    with pytest.raises(LmkError, match="--peft"):
        TrainArgs(**base, peft="ia3", lora="r=4").check()
    with pytest.raises(LmkError, match="--peft-args"):
        TrainArgs(**base, peft_args="r=4").check()


def test_selection_settings_are_checked():
    base = dict(task="classify", model="m", data="d", output="o")
    with pytest.raises(LmkError, match="--holdout"):
        TrainArgs(**base, holdout=0.7).check()
    with pytest.raises(LmkError, match="--holdout .* or --eval, not both"):
        TrainArgs(**base, holdout=0.1, eval_data="e").check()
    assert TrainArgs(**base, holdout=0.1, early_stop=2).check().holdout == 0.1


@pytest.mark.parametrize("changes, message", [
    ({"task": "rl"}, "--task 'rl': expected one of clm, mlm, classify, multi"),
    ({"epochs": 0}, "--epochs 0: expected at least 1"),
    ({"lr": 0.0}, "--lr 0.0: expected a positive number"),
    ({"batch_size": 0}, "--batch-size 0: expected at least 1"),
    ({"dropout": 1.0}, "--dropout 1.0: expected from 0 up to (not including) 1"),
    ({"early_stop": 3}, "--early-stop 3: expected used with --eval data or --holdout"),
    ({"metric": "bleu"}, "--metric 'bleu': expected one of loss, perplexity, accuracy, macro_f1"),
    ({"task": "clm", "metric": "accuracy"}, "--metric 'accuracy': expected loss or perplexity for this task"),
    ({"task": "mlm", "augment": 2}, "--augment 2: expected used with --task classify"),
    ({"adversarial": "fgsm"}, "--adversarial 'fgsm': expected fgm or pgd"),
    ({"adv_epsilon": 0.0}, "--adv-epsilon 0.0: expected a positive number"),
    ({"replay": 1.5}, "--replay 1.5: expected a fraction from 0 to 1"),
    ({"ewc": -1.0}, "--ewc -1.0: expected 0 or more"),
])
def test_a_setting_out_of_range_names_its_flag_value_and_what_was_expected(changes, message):
    with pytest.raises(LmkError, match=f"^{re.escape(message)}$"):
        TrainArgs(**{**BASE, **changes}).check()


def test_the_first_bad_setting_is_the_one_reported():
    with pytest.raises(LmkError, match=r"^--epochs 0: "):
        TrainArgs(**BASE, epochs=0, batch_size=0, clip=-1.0).check()


def test_multi_task_refuses_eval_files_and_adapters():
    with pytest.raises(LmkError, match=r"^--task 'multi': expected given each task's eval and test files"):
        TrainArgs(**{**BASE, "task": "multi"}, test_data="t").check()
    with pytest.raises(LmkError, match=r"^--task 'multi': expected full fine-tuning of one new model"):
        TrainArgs(**{**BASE, "task": "multi"}, peft="ia3").check()


def test_method_epochs_and_learning_rate_defaults():
    full = TrainArgs(**BASE)
    assert (full.method, full.num_epochs, full.peak_lr) == (None, 5, 1e-4)
    assert TrainArgs(**BASE, peft="full").method is None
    lora = TrainArgs(**BASE, lora="r=4")
    assert (lora.method, lora.num_epochs, lora.peak_lr) == (("lora", "r=4"), 3, 5e-4)
    ia3 = TrainArgs(**BASE, peft="ia3", peft_args="targets=k_proj")
    assert (ia3.method, ia3.num_epochs, ia3.peak_lr) == (("ia3", "targets=k_proj"), 3, 3e-3)
    assert TrainArgs(**BASE, peft="prompt").peak_lr == 3e-2
    given = TrainArgs(**BASE, peft="prompt", epochs=7, lr=2e-5)
    assert (given.num_epochs, given.peak_lr) == (7, 2e-5)


def test_from_mapping_takes_cli_spellings_and_aliases():
    args = TrainArgs.from_mapping({"task": "clm", "model": "m", "data": "d", "o": Path("out"), "lr-schedule": "cosine",
                                   "eval": "e.jsonl", "batch-size": 4, "lr": 1, "bf16": True, "epochs": None}, "run.yaml")
    assert (args.output, args.schedule, args.eval_data, args.batch_size, args.bf16, args.epochs) == \
        ("out", "cosine", "e.jsonl", 4, True, None)
    assert args.lr == 1.0 and isinstance(args.lr, float)
    assert TrainArgs.from_mapping(args.to_dict(), "run.json") == args


def test_from_mapping_starts_from_the_init_from_runs_model():
    args = TrainArgs.from_mapping({"task": "classify", "init_from": "runs/a", "data": "d", "output": "o"}, "c.yaml")
    assert (args.model, args.init_from) == ("runs/a", "runs/a")


@pytest.mark.parametrize("values, message", [
    ({**BASE, "bogus": 1}, "c.yaml: unknown setting 'bogus'; expected some of task, model, data, output, eval_data,"),
    ({"task": "clm", "model": "m"}, "c.yaml: missing required setting(s) data, output"),
    ({**BASE, "epochs": "3"}, "c.yaml: 'epochs' must be int, got '3'"),
    ({**BASE, "epochs": True}, "c.yaml: 'epochs' must be int, got True"),
    ({**BASE, "bf16": 1}, "c.yaml: 'bf16' must be bool, got 1"),
    ({**BASE, "lr": "fast"}, "c.yaml: 'lr' must be float, got 'fast'"),
    ({**BASE, "task": None}, "c.yaml: 'task' must not be empty"),
    ({**BASE, "task": 3}, "c.yaml: 'task' must be str, got 3"),
])
def test_from_mapping_refuses_unknown_missing_and_mistyped_settings(values, message):
    with pytest.raises(LmkError, match=f"^{re.escape(message)}"):
        TrainArgs.from_mapping(values, "c.yaml")


def test_read_yaml(tmp_path):
    good = tmp_path / "run.yaml"
    good.write_text("task: clm\nbatch-size: 8\n", encoding="utf-8")
    assert read_yaml(good) == {"task": "clm", "batch-size": 8}
    with pytest.raises(LmkError, match=f"^{re.escape(str(tmp_path / 'no.yaml'))}: no such config file$"):
        read_yaml(tmp_path / "no.yaml")
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(LmkError, match=re.escape(f"{listed}: expected a mapping of settings (key: value lines)")):
        read_yaml(listed)
    broken = tmp_path / "broken.yaml"
    broken.write_text("task: [clm\n", encoding="utf-8")
    with pytest.raises(LmkError, match=re.escape(f"{broken}: not a readable YAML file (")):
        read_yaml(broken)
