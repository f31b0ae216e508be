"""`lmk ensemble`: classifiers whose probabilities average, as one model directory that loads and serves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmkernel import LLM, LmkError, load_model
from lmkernel.train.args import TrainArgs
from lmkernel.train.ensemble import make_ensemble
from lmkernel.train.trainer import train
from shared_paths import SHARED_DATA
from test_cli import invoke

pytestmark = pytest.mark.slow  # three tiny training runs

PHRASEBANK = SHARED_DATA / "financial-phrasebank"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("ensemble")
    data = root / "train.jsonl"
    data.write_text("".join(PHRASEBANK.joinpath("train.jsonl").read_text(encoding="utf-8").splitlines(True)[:24]),
                    encoding="utf-8")
    out = []
    for seed, lora in ((0, None), (1, None), (2, "r=4,alpha=8")):  # a LoRA run is a member too
        args = TrainArgs(task="classify", model="all-minilm-l6-v2", data=str(data), output=str(root / f"run{seed}"),
                         max_steps=2, batch_size=8, lr=1e-3, warmup=0, checkpointing=False, seed=seed, lora=lora)
        train(args)
        out.append(root / f"run{seed}")
    return out


def test_the_ensemble_averages_its_members_probabilities(runs, tmp_path, phrasebank_sentences):
    out = invoke("ensemble", *map(str, runs), "-o", str(tmp_path / "ens"))
    assert out.returncode == 0, out.stderr
    spec = json.loads((tmp_path / "ens" / "ensemble.json").read_text())
    assert spec["members"] == ["members/0", "members/1", "members/2"]
    texts = phrasebank_sentences[:12]
    members = [LLM(str(r), verbose=False).classify(texts) for r in runs]
    got = LLM(str(tmp_path / "ens"), verbose=False).classify(texts)
    for i, g in enumerate(got):
        mean = {label: sum(m[i].probs[label] for m in members) / len(members) for label in g.probs}
        torch.testing.assert_close(torch.tensor(list(g.probs.values())), torch.tensor(list(mean.values())),
                                   rtol=1e-5, atol=1e-6)
        assert g.label == max(mean, key=mean.get)
    evaluated = invoke("eval", "classify", str(tmp_path / "ens"), "--data", str(PHRASEBANK / "valid.jsonl"),
                       "--limit", "20", "--json")
    assert evaluated.returncode == 0 and "accuracy" in json.loads(evaluated.stdout.strip().splitlines()[-1])


def test_the_ensemble_serves_embeddings_as_its_members_mean(runs, tmp_path):
    from fastapi.testclient import TestClient

    from lmkernel.engine.async_embedder import AsyncEmbedder
    from lmkernel.serve.app import ServerConfig, build_app

    make_ensemble([str(r) for r in runs[:2]], tmp_path / "ens")
    ensemble = load_model(tmp_path / "ens")
    app = build_app(ServerConfig(model_name=None, embedding_model_name="ens"), None, AsyncEmbedder(ensemble))
    with TestClient(app) as client:
        r = client.post("/v1/embeddings", json={"model": "ens", "input": ["Profit rose.", "Sales fell sharply."]})
    assert r.status_code == 200, r.text
    got = torch.tensor([d["embedding"] for d in r.json()["data"]])
    members = [load_model(r).embed(["Profit rose.", "Sales fell sharply."]) for r in runs[:2]]
    torch.testing.assert_close(got, (members[0] + members[1]) / 2, rtol=1e-5, atol=1e-5)


def test_members_that_do_not_fit_together_are_refused(runs, tmp_path):
    with pytest.raises(LmkError, match="two or more members"):
        make_ensemble([str(runs[0])], tmp_path / "one")
    with pytest.raises(LmkError, match="must be a fine-tuned classifier directory"):
        make_ensemble([str(runs[0]), "smollm2-135m-instruct"], tmp_path / "mixed")
    with pytest.raises(LmkError, match="not an encoder classifier"):
        make_ensemble([str(runs[0]), str(load_model("all-minilm-l6-v2").source.path)], tmp_path / "bare")
    assert not (tmp_path / "bare").exists()  # nothing published
