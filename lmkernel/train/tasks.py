"""The three training tasks: what an example is, how a batch is laid out, the loss, the evaluation
metrics, and which head a base model needs for the task (`heads` builds it).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmkernel.config import ModelConfig
from lmkernel.layers.attention import AttentionMetadata
from lmkernel.loader.tokenizer import Tokenizer
from lmkernel.train.data import IGNORE, DataError, augment, chat_tokens, field, holdout_split, pack, read_plain_text, \
    read_rows
from lmkernel.train.heads import bert_classifier_head, decoder_classifier_head, encoder_classifier_head, mlm_head

MASK_PROBABILITY = 0.15
DEFAULT_CLM_LENGTH = 1024
LOGIT_CHUNK = 1024  # scored tokens per output-layer call


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
        new, config, self.created = mlm_head(model, config, self.seed)
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
            new, config, self.created = decoder_classifier_head(model, config, id2label, self.seed)
        elif config.architecture != "bert":
            new, config, self.created = encoder_classifier_head(model, config, id2label, self.seed)
        else:
            new, config, self.created = bert_classifier_head(model, config, id2label, self.seed, checkpoint)
        return new, config


def _split(items: list[Any], keep: list[int], held: list[int], path: Path, flag: str) -> tuple[list[Any], list[Any]]:
    if not held or not keep:
        raise DataError(f"{flag} {path}: {len(items)} examples are too few to hold out {len(held)} of them for "
                        "selection; use more data, a different --holdout, or --eval")
    return [items[i] for i in keep], [items[i] for i in held]


TASKS: dict[str, type[Task]] = {"clm": CausalLM, "mlm": MaskedLM, "classify": Classification}
