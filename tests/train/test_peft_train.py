"""`lmk train --peft KIND` end to end on a PhraseBank slice: the loss falls, only the method's parameters
(and the new classifier) train, the run saves its adapter kind, AdaLoRA ends at its target rank budget,
and the saved run scores its --test split as a user would load it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lmkernel.train.args import TrainArgs
from lmkernel.train.trainer import train
from shared_paths import SHARED_DATA

pytestmark = pytest.mark.slow  # training runs

PHRASEBANK = SHARED_DATA / "financial-phrasebank"
PEFT_TYPES = {"adalora": "ADALORA", "ia3": "IA3", "prompt": "PROMPT_TUNING", "adapter": "BOTTLENECK"}


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("phrasebank")
    out = []
    for name, n in (("train", 48), ("valid", 24)):
        lines = (PHRASEBANK / f"{name}.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:n]
        (d / f"{name}.jsonl").write_text("".join(lines), encoding="utf-8")
        out.append(d / f"{name}.jsonl")
    return out[0], out[1]


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "lr" in r]


@pytest.mark.parametrize("kind,spec,lr", [("adalora", "r=6,target_r=2,tinit=0.1,tfinal=0.3,every=2", 5e-3),
                                          ("ia3", "", 3e-2), ("prompt", "tokens=8", 3e-1), ("adapter", "size=16", 3e-3)])
def test_each_method_trains_saves_its_kind_and_scores_its_test_split(kind, spec, lr, slices, tmp_path):
    args = TrainArgs(task="classify", model="all-minilm-l6-v2", data=str(slices[0]), holdout=0.25, test_data=str(slices[1]),
                     output=str(tmp_path / kind), peft=kind, peft_args=spec, epochs=8, batch_size=8, lr=lr, warmup=0,
                     checkpointing=False, dropout=0.0).check()
    result = train(args)
    losses = _losses(Path(args.output))
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4]), losses
    assert 0 < result.trainable_parameters < 1_000_000  # the method and the classifier, not the 22M of the encoder
    assert set(result.test_metrics) >= {"accuracy", "macro_f1"}
    model = Path(args.output) / "model"
    config = json.loads((model / "adapter_config.json").read_text())
    assert config["peft_type"] == PEFT_TYPES[kind] and config["base_model_name_or_path"] == "all-minilm-l6-v2"
    tensors = load_file(model / "adapter_model.safetensors")
    if kind == "adalora":  # the allocator's final pattern: the total kept rank is the target budget
        kept = sum(sum(mask) for mask in config["rank_pattern"].values())
        assert kept == 2 * len(config["rank_pattern"]) == sum(t.shape[0] for k, t in tensors.items() if k.endswith("lora_E"))
    if kind == "prompt":
        assert tensors["prompt_embeddings"].shape == (8, 384)


def test_prefix_tuning_a_decoder_trains_saves_and_is_scored_offline(tmp_path):
    from test_trainer import CHATS

    from lmkernel.loading import load_model
    from lmkernel.models.virtual_tokens import PrefixTuned

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    args = TrainArgs(task="clm", model="smollm2-135m-instruct", data=str(data), eval_data=str(data),
                     output=str(tmp_path / "prefix"), epochs=4, batch_size=2, max_length=128, warmup=0, peft="prefix",
                     peft_args="tokens=4", save_every=100).check()
    result = train(args)
    losses = _losses(Path(args.output))
    assert losses[-1] < 0.8 * losses[0], losses
    config = json.loads((Path(args.output) / "model" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["num_virtual_tokens"], config["prefix_projection"]) == ("PREFIX_TUNING", 4, False)
    tuned = load_model(args.output)  # the base it names, wrapped: scored offline, refused by the engine
    assert isinstance(tuned.model, PrefixTuned)
    assert result.best is not None and result.best < result.eval_metrics["loss"] + 1e-6
