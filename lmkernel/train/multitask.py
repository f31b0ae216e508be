"""Multi-task learning (`lmk train --task multi --data tasks.yaml`): one shared encoder, a classification
head per task, each task's examples mixed into the batches in proportion to its weight, and each task
evaluated on its own split. The YAML lists the tasks:

    tasks:
      - name: sentiment          # a directory name: letters, digits, - and _
        kind: classify           # the kind of each task (classification heads on a BERT encoder)
        data: train.jsonl        # text + label, as --task classify reads
        eval: valid.jsonl        # optional: else --holdout of `data` chooses
        test: test.jsonl         # optional: scored once on the saved model
        weight: 1.0              # examples per epoch: weight x the task's training set (seeded draw)

The run directory's `model/` holds one model per task (`model/<name>/`, a BertForSequenceClassification
sharing the trained encoder) and `multitask.json` listing them; paths in the YAML are relative to it.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmkernel.config import ModelConfig
from lmkernel.train.data import DataError
from lmkernel.loader.hf_export import save_model_dir
from lmkernel.loader.tokenizer import Tokenizer
from lmkernel.train.args import read_yaml
from lmkernel.train.heads import INIT_STD
from lmkernel.train.tasks import Classification, Task

MANIFEST = "multitask.json"
KINDS = ("classify",)


@dataclass(frozen=True)
class SubTask:
    name: str
    kind: str
    data: Path
    eval: Path | None
    test: Path | None
    weight: float


def read_tasks(path: Path) -> list[SubTask]:
    """The YAML's task list, checked: every error names the file, the task and the field."""
    raw = read_yaml(path).get("tasks")
    if not isinstance(raw, list) or len(raw) < 2:
        raise DataError(f"--data {path}: expected `tasks:`, a list of two or more tasks (name, kind, data, weight)")
    out: list[SubTask] = []
    for i, t in enumerate(raw):
        where = f"--data {path}, task {i + 1}"
        if not isinstance(t, dict):
            raise DataError(f"{where}: expected a mapping of name, kind, data, eval, test, weight")
        unknown = set(t) - {"name", "kind", "data", "eval", "test", "weight"}
        if unknown:
            raise DataError(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        name = t.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name) or name in {s.name for s in out}:
            raise DataError(f"{where}: field 'name' is {name!r}; expected a new name of letters, digits, - and _")
        if t.get("kind", "classify") not in KINDS:
            raise DataError(f"{where} ({name}): field 'kind' is {t.get('kind')!r}; expected one of {', '.join(KINDS)}")
        weight = t.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise DataError(f"{where} ({name}): field 'weight' is {weight!r}; expected a positive number")
        files = {}
        for key in ("data", "eval", "test"):
            value = t.get(key)
            if value is None and key != "data":
                files[key] = None
                continue
            if not isinstance(value, str) or not value:
                raise DataError(f"{where} ({name}): field '{key}' is {value!r}; expected a file path")
            files[key] = (path.parent / value) if not Path(value).is_absolute() else Path(value)
        out.append(SubTask(name, t.get("kind", "classify"), files["data"], files["eval"], files["test"], float(weight)))
    return out


class MultiHead(nn.Module):
    """A shared encoder (BERT with its pooler) and one classification head per task."""

    def __init__(self, encoder: nn.Module, heads: Mapping[str, nn.Linear]) -> None:
        super().__init__()
        self.encoder, self.heads, self.config = encoder, nn.ModuleDict(dict(heads)), encoder.config

    @property
    def checkpoint_layers(self) -> bool:
        return self.encoder.checkpoint_layers

    @checkpoint_layers.setter
    def checkpoint_layers(self, value: bool) -> None:
        self.encoder.checkpoint_layers = value

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.encoder(*args, **kwargs)

    def classify_task(self, name: str, hidden: torch.Tensor, meta: Any) -> torch.Tensor:
        """Task `name`'s logits from each sequence's first token, through the shared pooler (as BERT's head)."""
        first = hidden[torch.tensor(meta.cu_seqlens[:-1], device=hidden.device)]
        return self.heads[name](self.encoder.dropout(torch.tanh(self.encoder.bert.pooler.dense(first))))


class _HeadView:
    """One task's view of a `MultiHead`: the interface `Classification` calls (forward, classify)."""

    def __init__(self, model: MultiHead, name: str) -> None:
        self.model, self.name = model, name

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.model(*args, **kwargs)

    def classify(self, hidden: torch.Tensor, meta: Any) -> torch.Tensor:
        return self.model.classify_task(self.name, hidden, meta)


@dataclass(frozen=True)
class MultiBatch:
    """Each task's micro-batch of one step; the counts are their sums."""

    parts: tuple[tuple[int, Any], ...]
    num_tokens: int
    num_targets: int


class MultiTask(Task):
    """Several classification tasks on one encoder; an item is (task index, that task's item)."""

    name = "multi"
    metric = "accuracy"  # the mean over the tasks
    higher_is_better = True

    def __init__(self, tokenizer: Tokenizer, config: ModelConfig, max_length: int | None, seed: int) -> None:
        if not config.is_encoder:
            raise DataError(f"--task multi trains classification heads on a BERT encoder; this is {config.architecture}")
        super().__init__(tokenizer, config, max_length, seed)
        self.fresh = replace(config, hf_architecture="BertModel", id2label={})  # labels come from each task's data
        self.tasks: list[SubTask] = []
        self.subs: list[Classification] = []
        self.tests: list[list[Any] | None] = []

    def read_split(self, path: Path, flag: str, holdout: float) -> tuple[list[Any], list[Any] | None]:
        self.tasks = read_tasks(path)
        self.subs = [Classification(self.tokenizer, self.fresh, self.max_length, self.seed) for _ in self.tasks]
        rng = random.Random(self.seed)  # nosec B311  # seeded order for data and benchmarks, not a secret
        items: list[Any] = []
        chosen: list[Any] = []
        for t, (spec, sub) in enumerate(zip(self.tasks, self.subs)):
            label = f"--data {path} (task {spec.name})"
            train, held = sub.read_split(spec.data, label, 0.0 if spec.eval else holdout)
            if spec.eval:
                held = sub.read(spec.eval, f"{label} eval", training=False)
            if held is None:
                raise DataError(f"{label}: no split to evaluate it on; give the task an `eval` file or use --holdout")
            whole, part = divmod(spec.weight, 1.0)
            drawn = train * int(whole) + rng.sample(train, round(part * len(train)))
            items += [(t, item) for item in drawn]
            chosen += [(t, item) for item in held]
            self.tests.append(sub.read(spec.test, f"{label} test", training=False) if spec.test else None)
        return items, chosen

    def read(self, path: Path, flag: str, training: bool) -> list[Any]:
        raise DataError(f"{flag} {path}: --task multi takes each task's eval and test files in the --data YAML")

    def length(self, item: Any) -> int:
        return self.subs[item[0]].length(item[1])

    def collate(self, items: Sequence[Any], indices: Sequence[int], epoch: int, device: torch.device) -> MultiBatch:
        by_task: dict[int, list[Any]] = {}
        for i in indices:
            by_task.setdefault(items[i][0], []).append(items[i][1])
        parts = tuple((t, self.subs[t].collate(chosen, range(len(chosen)), epoch, device)) for t, chosen in by_task.items())
        return MultiBatch(parts, sum(b.num_tokens for _, b in parts), sum(b.num_targets for _, b in parts))

    def loss_sum(self, model: nn.Module, batch: MultiBatch) -> torch.Tensor:
        return sum(self.subs[t].loss_sum(_HeadView(model, self.tasks[t].name), b) for t, b in batch.parts)  # type: ignore[return-value]

    def evaluate(self, model: nn.Module, items: Sequence[Any], batch_size: int, device: torch.device) -> dict[str, float]:
        """Each task's loss, accuracy and macro-F1 on its own split (as "name/accuracy"), and their means."""
        out: dict[str, float] = {}
        for t, (spec, sub) in enumerate(zip(self.tasks, self.subs)):
            mine = [item for task, item in items if task == t]
            scores = sub.evaluate(_HeadView(model, spec.name), mine, batch_size, device)
            out.update({f"{spec.name}/{k}": v for k, v in scores.items()})
        for key in ("loss", "accuracy", "macro_f1"):
            out[key] = sum(out[f"{s.name}/{key}"] for s in self.tasks) / len(self.tasks)
        return out

    def prepare(self, model: nn.Module, config: ModelConfig,
                checkpoint: Callable[[], Mapping[str, torch.Tensor]]) -> tuple[nn.Module, ModelConfig]:
        encoder, config = self.subs[0].prepare(model, self.fresh, checkpoint)  # the pooler, from the file or new
        encoder.classifier = None
        g = torch.Generator().manual_seed(self.seed)
        heads = {}
        for spec, sub in zip(self.tasks, self.subs):
            head = nn.Linear(config.hidden_size, len(sub.labels))
            with torch.no_grad():
                head.weight.normal_(0.0, INIT_STD, generator=g)
                head.bias.zero_()
            heads[spec.name] = head
        self.created = ["heads"] + [n for n in self.subs[0].created if n != "classifier"]
        return MultiHead(encoder, heads), replace(config, id2label={})

    def save(self, model: MultiHead, target: Path, tokenizer: Tokenizer) -> None:
        """One BertForSequenceClassification per task under `target`, and the manifest listing them."""
        target.mkdir(parents=True, exist_ok=True)
        encoder = model.encoder
        for spec, sub in zip(self.tasks, self.subs):
            config = replace(encoder.config, id2label=dict(enumerate(sub.labels)))
            encoder.classifier = model.heads[spec.name]
            try:
                save_model_dir(encoder, config, tokenizer, torch.float32, target / spec.name, overwrite=True)
            finally:
                encoder.classifier = None
        manifest = {"tasks": [{"name": s.name, "labels": sub.labels} for s, sub in zip(self.tasks, self.subs)]}
        (target / MANIFEST).write_text(json.dumps(manifest, indent=2))

    def score_saved(self, target: Path, batch_size: int, device: torch.device) -> dict[str, float]:
        """Each task with a test file, scored once on its saved model as a user loads it."""
        from lmkernel.loading import load_model

        out: dict[str, float] = {}
        for spec, sub, test in zip(self.tasks, self.subs, self.tests):
            if test is None:
                continue
            saved = load_model(str(target / spec.name), device=str(device), quantization=None)
            saved.model.eval()
            with torch.inference_mode():
                scores = sub.evaluate(saved.model, test, batch_size, device)
            out.update({f"{spec.name}/{k}": v for k, v in scores.items()})
        return out
