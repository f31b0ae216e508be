"""lmkernel.bench.recbole_peer: the settings and shims it gives RecBole and the result it writes, through a stand-in RecBole and (slow) RecBole itself."""

from __future__ import annotations

import json
import math
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from lmkernel.bench import recbole_peer

LEAVE_ONE_OUT = {
    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
    "metrics": ["Hit", "NDCG", "MRR"], "topk": [10], "valid_metric": "NDCG@10",
    "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
}
NUMPY_ALIASES = {"float_": np.float64, "complex_": np.complex128, "unicode_": np.str_}


@pytest.fixture
def bare(monkeypatch):
    """NumPy without its removed aliases, no weights-only override and torch's thread count recorded, each put back
    after the test."""
    for name in NUMPY_ALIASES:
        monkeypatch.setattr(np, name, None, raising=False)
        monkeypatch.delattr(np, name)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "")
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    return threads


def fake_recbole(seen: dict) -> dict[str, types.ModuleType]:
    """A RecBole whose parts record how they are called: three test users (ids 3, 1, 3 in the test data), whose
    top 10 are the ten item ids from their own id up; fit runs three epochs."""
    users = ["[PAD]", "ann", "bob", "cid"]
    items = ["[PAD]"] + [f"i{n}" for n in range(1, 14)]

    class Config(dict):
        def __init__(self, model, dataset, config_dict):
            super().__init__(config_dict, model=model, dataset=dataset, reproducibility=True, MODEL_TYPE="TYPE")
            seen["config"] = (model, dataset, config_dict)

    class Dataset:
        uid_field, iid_field = "user_id", "item_id"

        def id2token(self, field, ids):
            table = users if field == self.uid_field else items
            return table[ids] if isinstance(ids, int) else np.array([table[i] for i in ids])

    dataset = Dataset()
    train = types.SimpleNamespace(_dataset=dataset)
    test = types.SimpleNamespace(dataset=types.SimpleNamespace(inter_feat={"user_id": torch.tensor([3, 1, 3])}))

    class Model(torch.nn.Module):
        def __init__(self, config, data) -> None:
            super().__init__()
            assert data is dataset
            seen["model"] = config["model"]

        def to(self, device):
            seen["device"] = device
            return self

    class Trainer:
        def __init__(self, config, model) -> None:
            self.model = model

        def _train_epoch(self, train_data, epoch_idx):
            assert train_data is train
            return 0.5

        def fit(self, train_data, valid_data, saved, show_progress):
            seen["fit"] = (saved, show_progress)
            for epoch in range(3):
                self._train_epoch(train_data, epoch)
            return 0.25, {"ndcg@10": np.float32(0.25), "hit@10": 0.5}

        def evaluate(self, test_data, load_best_model, show_progress):
            assert test_data is test
            seen["evaluate"] = (load_best_model, show_progress)
            return {"ndcg@10": np.float64(0.125), "hit@10": 0.5}

    def full_sort_topk(uids, model, test_data, k, device):
        seen["topk"] = (uids.tolist(), model.training, k, device)
        return None, torch.stack([torch.arange(u, u + k) for u in uids.tolist()])

    def get_trainer(model_type, model_name):
        seen["trainer"] = (model_type, model_name)
        return Trainer

    modules = {name: types.ModuleType(name) for name in ("recbole", "recbole.config", "recbole.data", "recbole.utils",
                                                        "recbole.utils.case_study")}
    modules["recbole.config"].Config = Config
    modules["recbole.data"].create_dataset = lambda config: dataset
    modules["recbole.data"].data_preparation = lambda config, data: (train, "valid", test)
    modules["recbole.utils"].get_model = lambda name: Model
    modules["recbole.utils"].get_trainer = get_trainer
    modules["recbole.utils"].init_seed = lambda seed, reproducibility: seen.setdefault("seeds", []).append(
        (seed, reproducibility))
    modules["recbole.utils.case_study"].full_sort_topk = full_sort_topk
    return modules


@pytest.mark.parametrize(("model", "extra", "env_threads", "threads"), [
    ("Pop", {}, None, 2), ("SASRec", {"train_neg_sample_args": None}, "3", 3)])
def test_main_hands_recbole_the_leave_one_out_settings_and_writes_what_it_found(
        bare, monkeypatch, tmp_path: Path, model, extra, env_threads, threads) -> None:
    seen = {}
    for name, module in fake_recbole(seen).items():
        monkeypatch.setitem(sys.modules, name, module)
    if env_threads is None:
        monkeypatch.delenv("LMK_PEER_THREADS", raising=False)
    else:
        monkeypatch.setenv("LMK_PEER_THREADS", env_threads)
    data = tmp_path / "sets" / "tiny"
    out = tmp_path / "out.json"
    recbole_peer.main(model, str(data), str(out))

    assert seen["config"] == (model, "tiny", {
        **LEAVE_ONE_OUT, **extra, "data_path": str(tmp_path / "sets"), "checkpoint_dir": str(tmp_path / "sets" / f"saved-{model}"),
        "show_progress": False, "device": "cpu", "use_gpu": False, "state": "WARNING", "seed": 2020})
    assert seen["seeds"] == [(2020, True), (2020, True)] and seen["trainer"] == ("TYPE", model)
    assert seen["model"] == model and seen["device"] == "cpu"
    assert seen["fit"] == (True, False) and seen["evaluate"] == (True, False)
    assert seen["topk"] == ([1, 3], False, 10, "cpu")
    assert bare == [threads]
    assert all(getattr(np, name) is alias for name, alias in NUMPY_ALIASES.items())
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"

    result = json.loads(out.read_text())
    assert result.pop("seconds") >= 0
    assert result == {"model": model, "valid": {"ndcg@10": 0.25, "hit@10": 0.5}, "test": {"ndcg@10": 0.125, "hit@10": 0.5},
                      "top10": {"ann": [f"i{n}" for n in range(1, 11)], "cid": [f"i{n}" for n in range(3, 13)]},
                      "epochs": 3}


def test_count_epochs_counts_each_call_and_passes_it_through() -> None:
    calls = []
    trainer = types.SimpleNamespace(_train_epoch=lambda *args, **kwargs: calls.append((args, kwargs)) or len(calls) * 0.5)
    count = recbole_peer.count_epochs(trainer)
    assert count == [0]
    assert trainer._train_epoch("data", 0, show_progress=False) == 0.5
    assert trainer._train_epoch("data", 1) == 1.0
    assert count == [2] and calls == [(("data", 0), {"show_progress": False}), (("data", 1), {})]


# Five users with four interactions each, written to the file newest first: by time u1 has a, b, e (train, train,
# valid) and then d (test). Nine items, so a top 10 is every item and the padding id.
SEQUENCES = {"u1": "abed", "u2": "abfc", "u3": "abgd", "u4": "achb", "u5": "cdia"}


@pytest.mark.slow  # importing RecBole takes about 6 s on one core, its Pop run a few more
def test_recbole_pop_on_five_users_masks_their_history_and_scores_their_last_item(bare, monkeypatch, tmp_path: Path) -> None:
    data = tmp_path / "tiny"
    data.mkdir()
    lines = [f"{u}\t{item}\t4\t{100 * n + 10 * k}" for n, (u, seq) in enumerate(SEQUENCES.items())
             for k, item in reversed(list(enumerate(seq)))]
    (data / "tiny.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)
    recbole_peer.main("Pop", str(data), str(tmp_path / "out.json"))
    result = json.loads((tmp_path / "out.json").read_text())

    assert result["model"] == "Pop" and result["epochs"] == 1  # RecBole trains Pop in one pass
    assert sorted(result["top10"]) == sorted(SEQUENCES)
    reciprocal, gain = [], []
    for user, seq in SEQUENCES.items():
        top = result["top10"][user]
        assert sorted(top) == sorted(set("abcdefghi") | {"[PAD]"})
        assert set(top[-4:]) == set(seq[:3]) | {"[PAD]"}  # train and valid items by time ranked last, masked
        rank = top.index(seq[3]) + 1
        reciprocal.append(1 / rank)
        gain.append(1 / math.log2(rank + 1))
    assert result["test"]["hit@10"] == 1.0
    assert result["test"]["mrr@10"] == pytest.approx(sum(reciprocal) / 5, abs=1e-4)
    assert result["test"]["ndcg@10"] == pytest.approx(sum(gain) / 5, abs=1e-4)
    assert list((tmp_path / "saved-Pop").glob("*.pth"))


@pytest.mark.slow  # RecBole's import, as above
def test_sasrec_needs_its_model_setting_to_run_at_all(monkeypatch, tmp_path: Path) -> None:
    for name, alias in NUMPY_ALIASES.items():
        monkeypatch.setattr(np, name, alias, raising=False)
    from recbole.config import Config

    base = {**recbole_peer.EVAL, "data_path": str(tmp_path), "device": "cpu", "use_gpu": False, "state": "WARNING"}
    with pytest.raises(ValueError, match="train_neg_sample_args .* should be None when the loss_type is CE"):
        Config(model="SASRec", dataset="tiny", config_dict=base)
    config = Config(model="SASRec", dataset="tiny", config_dict={**base, **recbole_peer.MODEL_SETTINGS["SASRec"]})
    assert config["loss_type"] == "CE" and config["train_neg_sample_args"]["distribution"] == "none"
    assert config["eval_args"]["order"] == "TO" and config["eval_args"]["split"] == {"LS": "valid_and_test"}
