"""`lmk bench train`: fine-tuning a sentence encoder on Financial PhraseBank, lmkernel against Hugging
Face Trainer (with peft for LoRA), in one run.

Quality: lmkernel's defaults (no tuning flags) on the whole training split, full and LoRA, scored on
the validation split. Speed and memory: the same number of steps at the same batch size and
learning rate on the same data, each side in a fresh child process (`python -m lmkernel.bench.train
SIDE ...`) that ends by saving its model, so peak resident memory is that run's alone. Speed counts
real (unpadded) tokens per second over the steps after the first few; each side batches as it does
by default (lmkernel by length, with no padding; the Trainer at random, padded to the longest).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess  # nosec B404  # runs our own commands as argument lists, never a shell
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lmkernel.train.args import DEFAULT_LR_FULL, DEFAULT_LR_LORA

WARMUP_STEPS = 3
LORA_SPEC = "r=8,alpha=16,dropout=0.05"
# peft's names for the layers lmkernel's default LoRA targets in a BERT encoder (not the pooler).
PEFT_BERT_TARGETS = r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"


@dataclass
class SpeedResult:
    side: str
    tokens_per_s: float
    peak_rss_bytes: int  # of the whole process: imports, model, data and training
    steps: int


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _steady_rate(times: list[float], tokens: list[int]) -> float:
    """Tokens per second from the end of step WARMUP_STEPS to the last step."""
    return sum(tokens[WARMUP_STEPS + 1 :]) / (times[-1] - times[WARMUP_STEPS])


def ours(model: str, data: Path, steps: int, batch_size: int, lora: bool, work: Path) -> SpeedResult:
    from lmkernel.train.args import TrainArgs
    from lmkernel.train.trainer import train

    args = TrainArgs(task="classify", model=model, data=str(data), output=str(work / "ours"), max_steps=steps,
                     batch_size=batch_size, lora=LORA_SPEC if lora else None, save_every=10**9)
    train(args)
    records = [json.loads(line) for line in (work / "ours" / "metrics.jsonl").read_text().splitlines()]
    rate = _steady_rate([r["elapsed_s"] for r in records], [r["tokens"] for r in records])
    return SpeedResult("lmkernel", rate, _peak_rss(), steps)


def huggingface(model_dir: Path, data: Path, steps: int, batch_size: int, lora: bool, work: Path) -> SpeedResult:
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)

    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    labels = sorted({r["label"] for r in rows})
    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # nosec B615  # a local directory or file: the hub is never reached (nothing downloads at run time)
    net = AutoModelForSequenceClassification.from_pretrained(  # nosec B615  # a local directory or file: the hub is never reached (nothing downloads at run time)
        model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    if lora:
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(net, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="SEQ_CLS",
                                             target_modules=PEFT_BERT_TARGETS))
    encoded = tokenizer([r["text"] for r in rows], truncation=True, max_length=256)
    dataset = [{"input_ids": ids, "attention_mask": mask, "labels": labels.index(r["label"])}
               for ids, mask, r in zip(encoded["input_ids"], encoded["attention_mask"], rows)]
    collate = DataCollatorWithPadding(tokenizer)
    seen: list[int] = []
    times: list[float] = []

    def counting(features):
        batch = collate(features)
        seen.append(int(batch["attention_mask"].sum()))
        return batch

    class Clock(TrainerCallback):
        def on_step_end(self, *_args, **_kwargs):
            times.append(time.perf_counter())

    targs = TrainingArguments(
        output_dir=str(work / "hf"), per_device_train_batch_size=batch_size, max_steps=steps,
        learning_rate=DEFAULT_LR_LORA if lora else DEFAULT_LR_FULL, warmup_steps=0.06, weight_decay=0.01, lr_scheduler_type="linear",
        logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    torch.manual_seed(0)
    trainer = Trainer(model=net, args=targs, train_dataset=dataset, data_collator=counting, callbacks=[Clock()])
    trainer.train()
    trainer.save_model(str(work / "hf" / "model"))  # the same work as lmkernel's run, which ends saving its model
    return SpeedResult("transformers" + (" + peft" if lora else ""), _steady_rate(times, seen[: len(times)]),
                       _peak_rss(), steps)


def quality(model: str, train_data: Path, valid: Path, lora: bool, work: Path) -> dict[str, float]:
    """lmkernel's defaults on the whole training split; the validation scores of the best model."""
    from lmkernel.train.args import TrainArgs
    from lmkernel.train.trainer import train

    name = "lora" if lora else "full"
    started = time.perf_counter()
    result = train(TrainArgs(task="classify", model=model, data=str(train_data), eval_data=str(valid),
                             output=str(work / name), lora=LORA_SPEC if lora else None))
    records = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    best = next(r for r in records if "lr" not in r and r["step"] == result.best_step)
    return {"accuracy": best["accuracy"], "macro_f1": best["macro_f1"], "seconds": time.perf_counter() - started,
            "steps": result.steps, "best_step": result.best_step}


def run_child(side: str, *args: str) -> dict:
    """One measurement in a fresh process; its JSON result."""
    out = subprocess.run([sys.executable, "-m", "lmkernel.bench.train", side, *args], capture_output=True, text=True)  # nosec B603  # an argument list this module builds, no shell
    if out.returncode != 0:
        raise RuntimeError(f"bench child '{side}' failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m lmkernel.bench.train")
    parser.add_argument("side", choices=["ours", "hf", "quality"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--valid", type=Path)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lora", action="store_true")
    a = parser.parse_args()
    if a.side == "quality" and a.valid is None:
        parser.error("quality needs --valid (the split the best model is chosen and scored on)")
    with tempfile.TemporaryDirectory(prefix="lmk-bench-train-") as tmp:
        if a.side == "ours":
            result: dict = asdict(ours(a.model, a.data, a.steps, a.batch_size, a.lora, Path(tmp)))
        elif a.side == "hf":
            result = asdict(huggingface(Path(a.model), a.data, a.steps, a.batch_size, a.lora, Path(tmp)))
        else:
            result = quality(a.model, a.data, a.valid, a.lora, Path(tmp))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
