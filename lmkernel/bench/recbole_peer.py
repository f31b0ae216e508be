"""One RecBole model on a dataset directory, in a child process: `python -m lmkernel.bench.recbole_peer MODEL
DATA_DIR OUT.json`. It runs as RecBole's own quick start does (the model's default configuration, early
stopping on the validation NDCG@10), with the evaluation set to the leave-one-out protocol, and writes
RecBole's own test metrics plus every test user's top 10, so the driver can score subsets (cold items) the
same way for every side.

Two shims let RecBole 1.2.1 run under this environment, and change nothing it computes: NumPy 2 removed the
aliases its compatibility code assigns (`np.float_` and friends), and torch >= 2.6 loads checkpoints
weights-only by default, which refuses the best-model file RecBole itself just wrote.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

EVAL = {
    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
    "metrics": ["Hit", "NDCG", "MRR"], "topk": [10], "valid_metric": "NDCG@10",
    "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]},
}
# What RecBole's documentation tells its users to set for a model to run at all: SASRec's default loss is
# cross-entropy over all items, which refuses the negative sampling the general defaults switch on.
MODEL_SETTINGS = {"SASRec": {"train_neg_sample_args": None}}


def main(model_name: str, data_dir: str, out: str) -> None:
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # RecBole's own checkpoint, just written
    import numpy as np

    for old, new in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
        if not hasattr(np, old):
            setattr(np, old, new)
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_seed
    from recbole.utils.case_study import full_sort_topk

    torch.set_num_threads(int(os.environ.get("LMK_PEER_THREADS", "2")))
    root = Path(data_dir)
    start = time.monotonic()
    config = Config(model=model_name, dataset=root.name, config_dict={
        **EVAL, **MODEL_SETTINGS.get(model_name, {}), "data_path": str(root.parent), "checkpoint_dir": str(root.parent / f"saved-{model_name}"),
        "show_progress": False, "device": "cpu", "use_gpu": False, "state": "WARNING", "seed": 2020})
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    epochs = count_epochs(trainer)
    best_valid, valid_result = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    test_result = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    users = test_data.dataset.inter_feat[dataset.uid_field].unique() if hasattr(test_data, "dataset") else None
    uids = torch.as_tensor(sorted(set(int(u) for u in users)))
    model.eval()
    _, top = full_sort_topk(uids, trainer.model, test_data, k=10, device="cpu")
    top_ids = {dataset.id2token(dataset.uid_field, int(u)): [str(t) for t in dataset.id2token(dataset.iid_field, row.tolist())]
               for u, row in zip(uids, top.cpu())}
    Path(out).write_text(json.dumps({
        "model": model_name, "valid": {k: float(v) for k, v in valid_result.items()},
        "test": {k: float(v) for k, v in test_result.items()}, "top10": top_ids,
        "epochs": epochs[0], "seconds": time.monotonic() - start}))


def count_epochs(trainer) -> list[int]:
    """A one-item list that counts the trainer's training epochs (RecBole keeps no count of its own)."""
    count = [0]
    train_epoch = trainer._train_epoch

    def counted(*args, **kwargs):
        count[0] += 1
        return train_epoch(*args, **kwargs)

    trainer._train_epoch = counted
    return count


if __name__ == "__main__":
    main(*sys.argv[1:4])
