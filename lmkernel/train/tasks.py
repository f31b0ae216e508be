"""The three training tasks: what an example is, how a batch is laid out, the loss, the evaluation
metrics, and the head a base model needs for the task.

A batch is the models' flattened varlen layout (`AttentionMetadata`): sequences end to end, no
padding. Losses are sums over scored targets; the trainer divides by the count over the whole
global batch, so gradient accumulation and several processes give the same update as one batch.

    clm       next-token cross-entropy on labelled tokens (assistant turns of a chat, all of plain text)
    mlm       cross-entropy on the 15% chosen tokens (80% shown as [MASK], 10% random, 10% unchanged)
    classify  cross-entropy of the class logits of each sequence
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmkernel.config import ModelConfig
from lmkernel.layers.attention import AttentionMetadata
from lmkernel.loader.tokenizer import Tokenizer
from lmkernel.models import model_class
from lmkernel.models.bert import CLASSIFIER_ARCHITECTURE, MLM_ARCHITECTURE
from lmkernel.models.weights import build_on_meta
from lmkernel.train.data import IGNORE, DataError, augment, chat_tokens, field, holdout_split, pack, read_plain_text, \
    read_rows

MASK_PROBABILITY = 0.15
DEFAULT_CLM_LENGTH = 1024
LOGIT_CHUNK = 1024  # scored tokens per output-layer call
INIT_STD = 0.02  # new heads start as Hugging Face initialises them (initializer_range)


@dataclass(frozen=True)
class Batch:
    """One micro-batch: tokens [N] with positions and layout, and targets ([N] per token with
    IGNORE where unscored, or [B] class ids). `num_targets` is what the loss sum counts."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    targets: torch.Tensor
    num_tokens: int
    num_targets: int


def _layout(sequences: Sequence[Sequence[int]], causal: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    meta = AttentionMetadata.for_lengths([len(s) for s in sequences], causal=causal)
    ids = torch.tensor([t for s in sequences for t in s], device=device)
    positions = torch.tensor([p for s in sequences for p in range(len(s))], device=device)
    return ids, positions, meta


def _truncate(ids: list[int], limit: int) -> list[int]:
    """At most `limit` tokens, keeping the last one (an encoder's [SEP])."""
    return ids if len(ids) <= limit else ids[: limit - 1] + ids[-1:]


def _init_linear(layer: nn.Linear, generator: torch.Generator) -> dict[str, torch.Tensor]:
    weight = torch.empty(layer.out_features, layer.in_features).normal_(0.0, INIT_STD, generator=generator)
    return {"weight": weight, "bias": torch.zeros(layer.out_features)}


class Task:
    """Base of the tasks; each subclass says how to read examples, batch them and score them."""

    name = ""
    metric = "loss"  # the validation metric early stopping and the best model follow
    higher_is_better = False
    causal = False

    def __init__(self, tokenizer: Tokenizer, config: ModelConfig, max_length: int | None, seed: int) -> None:
        self.tokenizer, self.config, self.seed = tokenizer, config, seed
        self.created: list[str] = []
        limit = min(config.max_seq_length or config.max_position_embeddings, config.max_position_embeddings)
        if max_length is not None and not 2 <= max_length <= config.max_position_embeddings:
            raise DataError(f"--max-length {max_length}: the model's context is {config.max_position_embeddings} "
                            "tokens; expected a length from 2 up to that")
        self.max_length = max_length or limit

    # What subclasses provide.
    def read(self, path: Path, flag: str, training: bool) -> list[Any]:
        raise NotImplementedError

    def read_split(self, path: Path, flag: str, holdout: float) -> tuple[list[Any], list[Any] | None]:
        """The training examples, and `holdout` of them set aside (seeded) to choose the best evaluation on."""
        items = self.read(path, flag, training=True)
        if not holdout:
            return items, None
        keep, held = holdout_split(len(items), holdout, self.seed)
        return _split(items, keep, held, path, flag)

    def length(self, item: Any) -> int:
        raise NotImplementedError

    def collate(self, items: Sequence[Any], indices: Sequence[int], epoch: int, device: torch.device) -> Batch:
        raise NotImplementedError

    def loss_sum(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, model: nn.Module, config: ModelConfig,
                checkpoint: Callable[[], Mapping[str, torch.Tensor]]) -> tuple[nn.Module, ModelConfig]:
        """The model with this task's head: taken from the `checkpoint` tensors where they hold it
        (a pooler the bare encoder did not build), else new and seeded."""
        return model, config

    def new_modules(self) -> list[str]:
        """Modules `prepare` created from scratch: a LoRA run trains them in full and saves them."""
        return list(self.created)

    # Shared.
    def evaluate(self, model: nn.Module, items: Sequence[Any], batch_size: int, device: torch.device) -> dict[str, float]:
        """Mean loss over the evaluation set (and perplexity for language modelling), in eval mode."""
        total, count = 0.0, 0
        for batch in self._eval_batches(items, batch_size, device):
            total += float(self.loss_sum(model, batch))
            count += batch.num_targets
        loss = total / max(count, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    def _eval_batches(self, items: Sequence[Any], batch_size: int, device: torch.device):
        order = sorted(range(len(items)), key=lambda i: self.length(items[i]))
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            yield self.collate(items, chosen, 0, device)


class CausalLM(Task):
    """Supervised fine-tuning of a decoder on chat JSONL (`{"messages": [...]}`: loss on assistant
    turns only), JSONL `{"text": ...}` or a plain .txt file (loss on every token). Examples are
    packed into rows of at most `max_length` tokens; a plain text file is cut into such rows."""

    name = "clm"
    causal = True

    def __init__(self, tokenizer: Tokenizer, config: ModelConfig, max_length: int | None, seed: int) -> None:
        if config.is_encoder:
            raise DataError(f"--task clm needs a decoder model (Llama, GPT-2); this is {config.hf_architecture or config.architecture}, an encoder")
        super().__init__(tokenizer, config, max_length or min(DEFAULT_CLM_LENGTH, config.max_position_embeddings), seed)

    def read(self, path: Path, flag: str, training: bool) -> list[list[tuple[list[int], list[int]]]]:
        eos = self.config.eos_token_ids[:1]
        if path.suffix.lower() == ".txt":
            text = "\n".join(row.fields["text"] for row in read_plain_text(path, flag))
            ids = self.tokenizer.encode(text) + eos
            cut = self.max_length
            return [[(ids[s : s + cut], ids[s : s + cut])] for s in range(0, len(ids) - 1, cut) if len(ids[s : s + cut]) > 1]
        sequences = []
        for row in read_rows(path, flag):
            where = f"{flag} {path}, line {row.line}"
            if "messages" in row.fields:
                messages = field(row, "messages", list, path, flag)
                if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
                    raise DataError(f"{where}: each message must be an object with string 'role' and 'content'")
                ids, labels = chat_tokens(self.tokenizer, messages, where)
            elif "text" in row.fields:
                ids = self.tokenizer.encode(field(row, "text", str, path, flag)) + eos
                labels = list(ids)
            else:
                raise DataError(f"{where}: expected a 'messages' list (chat) or a 'text' string")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            if sum(label != IGNORE for label in labels[1:]) == 0:
                raise DataError(f"{where}: no token to learn within --max-length {self.max_length} "
                                "(the assistant turn starts after the cut)")
            sequences.append((ids, labels))
        return [[sequences[i] for i in row] for row in pack([len(s[0]) for s in sequences], self.max_length)]

    def length(self, item: list[tuple[list[int], list[int]]]) -> int:
        return sum(len(ids) for ids, _ in item)

    def collate(self, items: Sequence[Any], indices: Sequence[int], epoch: int, device: torch.device) -> Batch:
        segments = [segment for i in indices for segment in items[i]]
        ids, positions, meta = _layout([s[0] for s in segments], True, device)
        targets = [t for _, labels in segments for t in [*labels[1:], IGNORE]]  # each token predicts the next
        scored = sum(t != IGNORE for t in targets)
        return Batch(ids, positions, meta, torch.tensor(targets, device=device), len(targets), scored)

    def loss_sum(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        hidden = model(batch.input_ids, batch.positions, batch.meta)
        scored = batch.targets != IGNORE  # the output layer runs only where a token is scored
        hidden, targets = hidden[scored], batch.targets[scored]
        total = hidden.new_zeros((), dtype=torch.float32)
        # A few thousand tokens of 50k-word logits would be gigabytes: the output layer runs a chunk
        # at a time, and in training each chunk's logits are recomputed in the backward pass.
        training = torch.is_grad_enabled() and model.training
        for s in range(0, targets.shape[0], LOGIT_CHUNK):
            args = (model, hidden[s : s + LOGIT_CHUNK], targets[s : s + LOGIT_CHUNK])
            total = total + (checkpoint(_token_loss, *args, use_reentrant=False) if training else _token_loss(*args))
        return total


def _token_loss(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model.compute_logits(hidden).float(), targets, reduction="sum")


class MaskedLM(Task):
    """Masked-LM for BERT: JSONL/CSV with a "text" field, or a .txt file (one example a line)."""

    name = "mlm"

    def __init__(self, tokenizer: Tokenizer, config: ModelConfig, max_length: int | None, seed: int) -> None:
        if not config.is_encoder:
            raise DataError(f"--task mlm needs an encoder model (BERT); this is {config.architecture}, a decoder (use --task clm)")
        super().__init__(tokenizer, config, max_length, seed)
        self.mask_id = tokenizer.token_to_id(tokenizer.special_tokens.get("mask_token", "[MASK]"))
        if self.mask_id is None:
            raise DataError(f"{tokenizer.source}: the tokenizer has no mask token; masked-LM needs one")
        self.special = set(tokenizer.all_special_ids)

    def read(self, path: Path, flag: str, training: bool) -> list[list[int]]:
        rows = read_plain_text(path, flag) if path.suffix.lower() == ".txt" else read_rows(path, flag)
        texts = [field(row, "text", str, path, flag) for row in rows]
        return [_truncate(ids, self.max_length) for ids in self.tokenizer.encode_batch(texts)]

    def length(self, item: list[int]) -> int:
        return len(item)

    def mask(self, ids: list[int], rng: random.Random) -> tuple[list[int], list[int]]:
        """Inputs and targets of one example: 15% of its ordinary tokens chosen (at least one)."""
        candidates = [p for p, t in enumerate(ids) if t not in self.special]
        chosen = [p for p in candidates if rng.random() < MASK_PROBABILITY] or candidates[:1]
        inputs, targets = list(ids), [IGNORE] * len(ids)
        for p in chosen:
            targets[p] = ids[p]
            roll = rng.random()
            if roll < 0.8:
                inputs[p] = self.mask_id
            elif roll < 0.9:
                inputs[p] = rng.randrange(self.config.vocab_size)
        return inputs, targets

    def collate(self, items: Sequence[Any], indices: Sequence[int], epoch: int, device: torch.device) -> Batch:
        masked = [self.mask(items[i], random.Random(f"{self.seed}:{epoch}:{i}")) for i in indices]  # nosec B311  # seeded order for data and benchmarks, not a secret
        ids, positions, meta = _layout([m[0] for m in masked], False, device)
        targets = [t for _, ts in masked for t in ts]
        scored = sum(t != IGNORE for t in targets)
        return Batch(ids, positions, meta, torch.tensor(targets, device=device), len(targets), scored)

    def loss_sum(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        hidden = model(batch.input_ids, batch.positions, batch.meta)
        scored = batch.targets != IGNORE
        logits = model.mlm_logits(hidden[scored])
        return F.cross_entropy(logits.float(), batch.targets[scored], reduction="sum")

    def prepare(self, model: nn.Module, config: ModelConfig,
                checkpoint: Callable[[], Mapping[str, torch.Tensor]]) -> tuple[nn.Module, ModelConfig]:
        if model.cls is not None:
            return model, config
        self.created = ["cls.predictions.transform"]  # its output bias stays zero, as a fresh transformers head
        config = replace(config, hf_architecture=MLM_ARCHITECTURE, tie_word_embeddings=True)
        new = build_on_meta(model_class(config), config)
        g = torch.Generator().manual_seed(self.seed)
        transform = new.cls.predictions.transform
        head = {f"cls.predictions.transform.dense.{k}": v for k, v in _init_linear(transform.dense, g).items()}
        head.update({"cls.predictions.transform.LayerNorm.weight": torch.ones(config.hidden_size),
                     "cls.predictions.transform.LayerNorm.bias": torch.zeros(config.hidden_size),
                     "cls.predictions.bias": torch.zeros(config.vocab_size)})
        new.load_weights({**model.state_dict(), **head}, f"{config.hf_architecture} head")
        return new, config


class Classification(Task):
    """Sequence classification: JSONL or CSV with "text" and "label"; the labels come from the
    training data (sorted) and are saved with the model as id2label/label2id."""

    name = "classify"
    metric = "accuracy"
    higher_is_better = True

    def __init__(self, tokenizer: Tokenizer, config: ModelConfig, max_length: int | None, seed: int,
                 augment_copies: int = 0) -> None:
        if config.architecture not in ("bert", "mpnet", "nomic_bert", "llama") and not (
                config.architecture == "gemma3" and config.is_encoder):
            raise DataError(f"--task classify needs an encoder (BERT, MPNet, nomic-bert, EmbeddingGemma) or a "
                            f"Llama-family decoder; this is {config.architecture}")
        super().__init__(tokenizer, config, max_length, seed)
        self.labels: list[str] = [config.id2label[i] for i in sorted(config.id2label)] if config.is_classifier else []
        self.causal = not config.is_encoder  # a decoder reads each sentence left to right and is scored on its last token
        self.augment_copies = augment_copies

    def read(self, path: Path, flag: str, training: bool) -> list[tuple[list[int], int]]:
        texts, ids = self._examples(path, flag, training)
        return self._items(texts, ids, training)

    def read_split(self, path: Path, flag: str, holdout: float) -> tuple[list[Any], list[Any] | None]:
        """As `Task.read_split`, held out within each label, before any augmentation (no copy of a held-out
        sentence is trained on)."""
        texts, ids = self._examples(path, flag, True)
        if not holdout:
            return self._items(texts, ids, True), None
        keep, held = holdout_split(len(ids), holdout, self.seed, ids)
        train, chosen = _split(list(zip(texts, ids)), keep, held, path, flag)
        return self._items(*map(list, zip(*train)), True), self._items(*map(list, zip(*chosen)), False)

    def _examples(self, path: Path, flag: str, training: bool) -> tuple[list[str], list[int]]:
        rows = read_rows(path, flag)
        texts = [field(row, "text", str, path, flag) for row in rows]
        labels = [str(field(row, "label", (str, int), path, flag)) for row in rows]
        if training and not self.labels:
            self.labels = sorted(set(labels))
            if len(self.labels) < 2:
                raise DataError(f"{flag} {path}: every example has the label '{self.labels[0]}'; classification needs two or more")
        index = {label: i for i, label in enumerate(self.labels)}
        for row, label in zip(rows, labels):
            if label not in index:
                raise DataError(f"{flag} {path}, line {row.line}: label '{label}' was never seen in the training "
                                f"data; known labels: {', '.join(self.labels)}")
        return texts, [index[label] for label in labels]

    def _items(self, texts: list[str], ids: list[int], training: bool) -> list[tuple[list[int], int]]:
        if training and self.augment_copies:
            texts, ids = augment(texts, ids, self.seed, self.augment_copies)
        return [(_truncate(t, self.max_length), y) for t, y in zip(self.tokenizer.encode_batch(texts), ids)]

    def length(self, item: tuple[list[int], int]) -> int:
        return len(item[0])

    def collate(self, items: Sequence[Any], indices: Sequence[int], epoch: int, device: torch.device) -> Batch:
        ids, positions, meta = _layout([items[i][0] for i in indices], self.causal, device)
        targets = torch.tensor([items[i][1] for i in indices], device=device)
        return Batch(ids, positions, meta, targets, int(ids.shape[0]), len(indices))

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model.classify(model(batch.input_ids, batch.positions, batch.meta), batch.meta)

    def loss_sum(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.logits(model, batch).float(), batch.targets, reduction="sum")

    def evaluate(self, model: nn.Module, items: Sequence[Any], batch_size: int, device: torch.device) -> dict[str, float]:
        """Loss, accuracy and macro-F1 (F1 of each label, averaged) over the evaluation set."""
        gold, predicted, total = [], [], 0.0
        for batch in self._eval_batches(items, batch_size, device):
            logits = self.logits(model, batch).float()
            total += float(F.cross_entropy(logits, batch.targets, reduction="sum"))
            gold.append(batch.targets.cpu())
            predicted.append(logits.argmax(-1).cpu())
        g, p = torch.cat(gold), torch.cat(predicted)
        n = len(self.labels)
        confusion = torch.bincount(g * n + p, minlength=n * n).view(n, n).double()
        tp = confusion.diag()
        f1 = 2 * tp / (confusion.sum(0) + confusion.sum(1)).clamp(min=1)
        present = (confusion.sum(0) + confusion.sum(1)) > 0
        return {"loss": total / len(g), "accuracy": float(tp.sum() / len(g)), "macro_f1": float(f1[present].mean())}

    def prepare(self, model: nn.Module, config: ModelConfig,
                checkpoint: Callable[[], Mapping[str, torch.Tensor]]) -> tuple[nn.Module, ModelConfig]:
        id2label = dict(enumerate(self.labels))
        if config.is_classifier and config.id2label == id2label:
            return model, config
        if not config.is_encoder:
            return self._decoder_head(model, config, id2label)
        if config.architecture != "bert":
            return self._encoder_head(model, config, id2label)
        self.created = ["classifier"]
        config = replace(config, hf_architecture=CLASSIFIER_ARCHITECTURE, id2label=id2label)
        new = build_on_meta(model_class(config), config)
        g = torch.Generator().manual_seed(self.seed)
        tensors = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
        tensors.update({f"classifier.{k}": v for k, v in _init_linear(new.classifier, g).items()})
        if model.bert.pooler is None:  # a bare encoder's checkpoint may still hold its pooler
            pooler = {f"bert.{k.removeprefix('bert.')}": v for k, v in checkpoint().items()
                      if k.removeprefix("bert.").startswith("pooler.dense.")}
            if len(pooler) < 2:
                pooler = {f"bert.pooler.dense.{k}": v for k, v in _init_linear(new.bert.pooler.dense, g).items()}
                self.created.append("bert.pooler")
            tensors.update(pooler)
        new.load_weights(tensors, f"{config.hf_architecture} head")
        return new, config

    def _encoder_head(self, model: nn.Module, config: ModelConfig, id2label: dict[int, str]) -> tuple[nn.Module, ModelConfig]:
        """transformers' head for the architecture, initialised as it does (normal, std 0.02; biases zero):
        MPNet's and nomic-bert's on the first token, Gemma3TextForSequenceClassification's `score` on the last."""
        classes = {"mpnet": "MPNetForSequenceClassification", "nomic_bert": "NomicBertForSequenceClassification",
                   "gemma3": "Gemma3TextForSequenceClassification"}
        config = replace(config, id2label=id2label, hf_architecture=classes[config.architecture])
        new = build_on_meta(model_class(config), config)
        g = torch.Generator().manual_seed(self.seed)
        keep = {k: v for k, v in model.state_dict().items() if not k.startswith(("classifier.", "score.", "pooler."))}
        if config.architecture == "mpnet":
            self.created = ["classifier"]
            head = {f"classifier.{part}.{k}": v for part in ("dense", "out_proj")
                    for k, v in _init_linear(getattr(new.classifier, part), g).items()}
        elif config.architecture == "nomic_bert":  # a GGUF holds no pooler: it starts new, as the classifier does
            self.created = ["pooler", "classifier"]
            head = {f"{part}.{k}": v for part in ("pooler", "classifier") for k, v in _init_linear(getattr(new, part), g).items()}
        else:
            self.created = ["score"]
            head = {"score.weight": torch.randn(len(id2label), config.hidden_size, generator=g) * INIT_STD}
        new.load_weights({**keep, **head}, f"{config.hf_architecture} head")
        return new, config

    def _decoder_head(self, model: nn.Module, config: ModelConfig, id2label: dict[int, str]) -> tuple[nn.Module, ModelConfig]:
        """A decoder with a new `score` layer on its last token (transformers' ...ForSequenceClassification,
        initialised as transformers does: normal, std 0.02, no bias)."""
        self.created = ["score"]
        family = {"qwen2": "Qwen2", "mistral": "Mistral"}.get(config.hf_model_type, "Llama")
        config = replace(config, hf_architecture=f"{family}ForSequenceClassification", id2label=id2label)
        new = build_on_meta(model_class(config), config)
        g = torch.Generator().manual_seed(self.seed)
        tensors = {k: v for k, v in model.state_dict().items() if not k.startswith("score.")}
        tensors["score.weight"] = torch.randn(len(id2label), config.hidden_size, generator=g) * 0.02
        new.load_weights(tensors, f"{config.hf_architecture} head")
        return new, config


def _split(items: list[Any], keep: list[int], held: list[int], path: Path, flag: str) -> tuple[list[Any], list[Any]]:
    if not held or not keep:
        raise DataError(f"{flag} {path}: {len(items)} examples are too few to hold out {len(held)} of them for "
                        "selection; use more data, a different --holdout, or --eval")
    return [items[i] for i in keep], [items[i] for i in held]


TASKS: dict[str, type[Task]] = {"clm": CausalLM, "mlm": MaskedLM, "classify": Classification}
