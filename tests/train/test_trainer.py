"""Tiny training runs on the real models: the loss falls, a killed run resumes exactly, a run
directory is a model, two processes train as one, and bad input stops before training starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmkernel.loading import load_model
from lmkernel.train.args import TrainArgs
from lmkernel.train.checkpoint import latest_checkpoint
from lmkernel.train.trainer import TrainingError, train
from shared_paths import SHARED_DATA
from test_cli import invoke

pytestmark = pytest.mark.slow  # training runs, torchrun: `make test` runs it, `make test-fast` does not

PHRASEBANK = SHARED_DATA / "financial-phrasebank"


def _head(path: Path, n: int, out: Path) -> Path:
    out.write_text("".join(path.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def phrasebank_small(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("phrasebank")
    return _head(PHRASEBANK / "train.jsonl", 32, d / "train.jsonl"), _head(PHRASEBANK / "valid.jsonl", 48, d / "valid.jsonl")


def _classify_args(data: tuple[Path, Path], output: Path, **overrides) -> TrainArgs:
    settings = dict(task="classify", model="all-minilm-l6-v2", data=str(data[0]), eval_data=str(data[1]),
                    output=str(output), epochs=6, batch_size=8, lr=2e-4, warmup=0, eval_every=6, save_every=4,
                    checkpointing=False)
    return TrainArgs(**{**settings, **overrides})


def _losses(run_dir: Path, kind: str = "loss") -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[kind]) for r in lines if kind in r and ("lr" in r) == (kind == "loss")]


@pytest.fixture(scope="module")
def classify_run(phrasebank_small, tmp_path_factory):
    args = _classify_args(phrasebank_small, tmp_path_factory.mktemp("runs") / "classify")
    return args, train(args)


def test_classification_loss_falls_and_the_run_directory_holds_everything(classify_run):
    args, result = classify_run
    run = Path(args.output)
    losses = [loss for _, loss in _losses(run)]
    assert len(losses) == result.steps == 24
    assert sum(losses[-4:]) < 0.6 * sum(losses[:4])  # six passes over 32 sentences: it learns them
    assert [step for step, _ in _losses(run, "accuracy")] == [6, 12, 18, 24]
    assert json.loads((run / "run.json").read_text())["lr"] == 2e-4
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000016", "step-00000020"]
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert result.best == max(acc for _, acc in _losses(run, "accuracy"))


def test_a_run_directory_is_a_model(classify_run, phrasebank_small):
    args, result = classify_run
    lm = load_model(args.output)
    assert lm.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    out = invoke("eval", "classify", args.output, "--data", str(phrasebank_small[1]), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["accuracy"] == pytest.approx(result.best, abs=1e-9)


def test_a_killed_run_resumes_to_the_same_losses(classify_run, phrasebank_small, tmp_path):
    args, _ = classify_run
    resumed = _classify_args(phrasebank_small, tmp_path / "killed")
    cmd = [sys.executable, "-m", "lmkernel.train", "--task", "classify", "--model", "all-minilm-l6-v2",
           "--data", resumed.data, "--eval", resumed.eval_data, "-o", resumed.output, "--epochs", "6",
           "--batch-size", "8", "--lr", "2e-4", "--warmup", "0", "--eval-every", "6", "--save-every", "4",
           "--no-checkpointing"]
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while latest_checkpoint(Path(resumed.output)) is None or latest_checkpoint(Path(resumed.output)).name < "step-00000008":
        assert child.poll() is None, child.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    killed_at = latest_checkpoint(Path(resumed.output)).name
    assert killed_at < "step-00000024"
    train(resumed, resume=True)
    assert _losses(Path(resumed.output)) == _losses(Path(args.output))  # exactly, step by step
    assert _losses(Path(resumed.output), "accuracy") == _losses(Path(args.output), "accuracy")


def test_early_stopping_ends_the_run_when_the_metric_stops_improving(phrasebank_small, tmp_path):
    args = _classify_args(phrasebank_small, tmp_path / "early", lr=1e-9, eval_every=1, early_stop=2, max_steps=10,
                          save_every=100, checkpointing=False)
    result = train(args)
    assert result.stopped_early and result.steps == 3 and result.best_step == 1


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(phrasebank_small, tmp_path):
    args = _classify_args(phrasebank_small, tmp_path / "nan", optimizer="sgd", lr=1e12, clip=0.0, save_every=1, checkpointing=False,
                          eval_data=None, eval_every=None, max_steps=12)
    with pytest.raises(TrainingError, match=r"loss became (nan|inf) at step \d+ .*last good checkpoint is .*step-0+\d+"):
        train(args)
    good = latest_checkpoint(Path(args.output))
    assert good is not None and torch.isfinite(torch.cat([t.flatten() for t in load_file(good / "trainable.safetensors").values()])).all()


def test_masked_lm_loss_falls(tmp_path):
    lines = [line for line in (SHARED_DATA / "wikitext-2" / "valid.txt").read_text().splitlines() if len(line.split()) > 8][:16]
    data = tmp_path / "text.txt"
    data.write_text("\n".join(lines))
    args = TrainArgs(task="mlm", model="all-minilm-l6-v2", data=str(data), output=str(tmp_path / "mlm"), epochs=4,
                     batch_size=8, max_length=48, lr=2e-4, warmup=0, checkpointing=False)
    result = train(args)
    losses = [loss for _, loss in _losses(Path(args.output))]
    assert result.steps == 8 and sum(losses[-2:]) < 0.8 * sum(losses[:2])
    assert json.loads((tmp_path / "mlm" / "model" / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]


CHATS = [
    {"messages": [{"role": "user", "content": "What colour is the sky on a clear day?"},
                  {"role": "assistant", "content": "The sky is blue on a clear day."}]},
    {"messages": [{"role": "user", "content": "Name a fruit that is yellow."},
                  {"role": "assistant", "content": "A banana is yellow."}]},
]


def test_two_processes_train_as_one(phrasebank_small, tmp_path):
    common = ["--task", "classify", "--model", "all-minilm-l6-v2", "--data", str(phrasebank_small[0]),
              "--max-steps", "4", "--dropout", "0", "--lr", "1e-4", "--no-checkpointing"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "lmkernel.train", *common, "--batch-size", "4", "-o", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    train(TrainArgs(task="classify", model="all-minilm-l6-v2", data=str(phrasebank_small[0]), max_steps=4, dropout=0.0,
                    lr=1e-4, checkpointing=False, batch_size=8, output=str(tmp_path / "one")))
    one_losses, two_losses = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _ in two_losses] == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor([l for _, l in two_losses]), torch.tensor([l for _, l in one_losses]),
                               rtol=1e-5, atol=1e-6)
    one, two_w = load_file(tmp_path / "one" / "model" / "model.safetensors"), load_file(tmp_path / "two" / "model" / "model.safetensors")
    for name in ("classifier.weight", "bert.encoder.layer.0.attention.self.query.weight"):
        torch.testing.assert_close(two_w[name], one[name], rtol=1e-4, atol=1e-6)


def _refused(tmp_path: Path, *args: str) -> str:
    out = invoke("train", *args, "-o", str(tmp_path / "refused"))
    assert out.returncode == 1
    assert not (tmp_path / "refused").exists()  # nothing written before the input is checked
    return " ".join(out.stderr.split())


def test_bad_input_is_refused_before_training_with_file_and_line(tmp_path, phrasebank_small):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert f"--data {empty}: the file is empty" in _refused(tmp_path, "--task", "classify", "--model", "all-minilm-l6-v2", "--data", str(empty))
    csv_file = tmp_path / "nolabel.csv"
    csv_file.write_text("text,sentiment\nProfits rose,positive\n")
    assert f"{csv_file}, line 2: missing the 'label' field" in _refused(
        tmp_path, "--task", "classify", "--model", "all-minilm-l6-v2", "--data", str(csv_file))
    unseen = tmp_path / "unseen.jsonl"
    unseen.write_text('{"text": "fine", "label": "neutral"}\n{"text": "odd", "label": "sarcastic"}\n')
    assert f"--eval {unseen}, line 2: label 'sarcastic' was never seen in the training data" in _refused(
        tmp_path, "--task", "classify", "--model", "all-minilm-l6-v2", "--data", str(phrasebank_small[0]), "--eval", str(unseen))
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps(CHATS[0]) + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert f"--data {chat}, line 2: the conversation has no assistant turn" in _refused(
        tmp_path, "--task", "clm", "--model", "smollm2-135m-instruct", "--data", str(chat))
    assert "--max-length 4096: the model's context is 512 tokens" in _refused(
        tmp_path, "--task", "mlm", "--model", "all-minilm-l6-v2", "--data", str(phrasebank_small[0]), "--max-length", "4096")
    assert "--lr -1.0: expected a positive number" in _refused(
        tmp_path, "--task", "classify", "--model", "all-minilm-l6-v2", "--data", str(phrasebank_small[0]), "--lr", "-1")


def _train_set_loss(lm, data: Path) -> float:
    from lmkernel.train.tasks import Classification

    task = Classification(lm.tokenizer, lm.config, None, 0)
    items = task.read(data, "--data", training=False)
    with torch.inference_mode():
        return task.evaluate(lm.model, items, 32, torch.device("cpu"))["loss"]


def test_lora_classification_saves_a_peft_adapter_that_loads_as_the_run(phrasebank_small, tmp_path):
    args = _classify_args(phrasebank_small, tmp_path / "lora", lora="r=8,alpha=16,dropout=0", lr=5e-3, epochs=6, checkpointing=False,
                          eval_data=None, eval_every=None, save_every=100)
    result = train(args)
    losses = [loss for _, loss in _losses(Path(args.output))]
    assert result.steps == 24 and sum(losses[-4:]) < 0.7 * sum(losses[:4])
    model = Path(args.output) / "model"
    config = json.loads((model / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == ("LORA", "SEQ_CLS", 8, 16)
    assert config["modules_to_save"] == ["classifier"] and config["base_model_name_or_path"] == "all-minilm-l6-v2"
    tensors = load_file(model / "adapter_model.safetensors")
    assert "base_model.model.classifier.weight" in tensors
    assert sum(".lora_A." in k for k in tensors) == 6 * 6  # q, k, v, attention output, intermediate, output per layer
    tuned = load_model(args.output)  # the base model it names, with the adapter and head folded in
    assert tuned.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert _train_set_loss(tuned, Path(args.data)) < 0.7 * losses[0]


def test_a_lora_chat_run_is_served_beside_its_base(tmp_path):
    from lmkernel.engine.llm import LLM
    from lmkernel.engine.sampling import SamplingParams

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    args = TrainArgs(task="clm", model="smollm2-135m-instruct", data=str(data), output=str(tmp_path / "clm-lora"),
                     epochs=4, batch_size=2, max_length=128, lr=3e-3, warmup=0, lora="r=8,alpha=16,dropout=0",
                     save_every=100)  # activation checkpointing on, as by default
    result = train(args)
    losses = [loss for _, loss in _losses(Path(args.output))]
    assert result.steps == 4 and losses[-1] < 0.7 * losses[0]
    assert json.loads((tmp_path / "clm-lora" / "model" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    prompt = [{"role": "user", "content": "Name a fruit that is yellow."}]
    greedy = SamplingParams(temperature=0, max_tokens=8)
    merged = LLM(args.output, kv_cache_memory="64MiB", verbose=False).chat([prompt], greedy)[0].outputs[0].text
    # The merged model is float (an adapter merges into dequantized weights): serve the base in float too.
    llm = LLM("smollm2-135m-instruct", lora={"tuned": str(tmp_path / "clm-lora" / "model")}, kv_cache_memory="64MiB",
              verbose=False, quantization=None)
    both = llm.chat([prompt, prompt], [SamplingParams(temperature=0, max_tokens=8, lora="tuned"), greedy])
    assert both[0].outputs[0].text == merged
    assert both[1].outputs[0].text == llm.chat([prompt], greedy)[0].outputs[0].text  # the base, in the same batch
