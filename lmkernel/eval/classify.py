"""Classification quality: accuracy and macro-F1 of a model's labels for a JSONL file of examples.

A model with a classification head (BertForSequenceClassification) predicts with it, its labels
named by `id2label`. A causal LM classifies zero-shot: each label is scored by the log-probability
of its words after a prompt that lists the labels, and the likeliest label wins.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lmkernel.errors import LmkError
from lmkernel.layers.attention import AttentionMetadata
from lmkernel.loading import LoadedModel

PROMPT = "Classify the text as one of: {labels}. Answer with the label only.\nText: {text}"


@dataclass(frozen=True)
class Example:
    text: str
    label: str


@dataclass(frozen=True)
class ClassifyResult:
    accuracy: float
    macro_f1: float
    examples: int
    labels: list[str]
    predictions: list[str]


def typos(text: str, rate: float, rng: random.Random) -> str:
    """`text` with character noise: each letter, with probability `rate`, swapped with the next character,
    dropped, or doubled (one of the three at random); the robustness check of adversarial training."""
    out: list[str] = []
    chars = list(text)
    i = 0
    while i < len(chars):
        c = chars[i]
        if c.isalpha() and rng.random() < rate:
            kind = rng.randrange(3)
            if kind == 0 and i + 1 < len(chars):
                out.extend((chars[i + 1], c))
                i += 2
                continue
            if kind == 2:
                out.append(c)
            if kind != 1:
                out.append(c)
            i += 1
            continue
        out.append(c)
        i += 1
    return "".join(out)


def with_typos(examples: Sequence[Example], rate: float, seed: int = 0) -> list[Example]:
    """A copy of the examples with `typos` at `rate` (seeded: the same copy every time)."""
    rng = random.Random(seed)  # nosec B311  # seeded order for data and benchmarks, not a secret
    return [Example(typos(e.text, rate, rng), e.label) for e in examples]


def read_examples(path: Path) -> list[Example]:
    """`{"text": ..., "label": ...}` objects, one per line; blank lines are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LmkError(f"--data {path}: cannot read it as UTF-8 text ({exc})") from None
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LmkError(f"--data {path}, line {number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not isinstance(row.get("label"), (str, int)):
            raise LmkError(f"--data {path}, line {number}: expected an object with a string 'text' and a 'label'")
        out.append(Example(row["text"], str(row["label"])))
    if not out:
        raise LmkError(f"--data {path}: no examples in the file")
    return out


def scores(gold: Sequence[str], predicted: Sequence[str]) -> tuple[float, float]:
    """Accuracy and macro-F1 (F1 per label, averaged over every label seen in either list)."""
    if len(gold) != len(predicted) or not gold:
        raise ValueError("gold and predicted labels must be equally many, and not none")
    accuracy = sum(g == p for g, p in zip(gold, predicted)) / len(gold)
    f1 = []
    for label in sorted(set(gold) | set(predicted)):
        tp = sum(g == label and p == label for g, p in zip(gold, predicted))
        fp = sum(g != label and p == label for g, p in zip(gold, predicted))
        fn = sum(g == label and p != label for g, p in zip(gold, predicted))
        f1.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return accuracy, sum(f1) / len(f1)


@torch.inference_mode()
def _head_predictions(lm: LoadedModel, texts: list[str]) -> list[str]:
    names = lm.config.id2label
    out: list[str] = [""] * len(texts)
    for order, batch in lm.length_batches(texts, 8192):
        meta = AttentionMetadata.for_lengths([len(b) for b in batch], causal=not lm.config.is_encoder)
        ids = torch.tensor([t for b in batch for t in b], device=lm.device)
        positions = torch.tensor([p for b in batch for p in range(len(b))], device=lm.device)
        best = lm.model.classify(lm.model(ids, positions, meta), meta).argmax(-1).tolist()
        for i, k in zip(order, best):
            out[i] = names.get(k, str(k))
    return out


def _prompt_ids(lm: LoadedModel, text: str, labels: list[str]) -> list[int]:
    question = PROMPT.format(labels=", ".join(labels), text=text)
    if lm.tokenizer.chat_template is not None:  # an instruction-tuned model answers in its own format
        ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=True)
        return list(ids)  # type: ignore[arg-type]
    return lm.tokenizer.encode(question + "\nLabel:", add_special_tokens=False)


@torch.inference_mode()
def _label_logprobs(lm: LoadedModel, prompts: list[list[int]], endings: list[list[int]]) -> torch.Tensor:
    """log p(ending | prompt) for every prompt and ending [prompts, endings], in one forward pass.

    When the endings start with distinct tokens, their first token decides, and each prompt runs
    once; otherwise every prompt runs with every ending.
    """
    room = lm.max_input_tokens - max(len(e) for e in endings)
    prompts = [p[-room:] for p in prompts]
    # (sequence, its prompt, the endings it scores)
    if len({e[0] for e in endings}) == len(endings):
        endings = [e[:1] for e in endings]
        jobs = [(p, i, list(range(len(endings)))) for i, p in enumerate(prompts)]
    else:
        jobs = [(p + e, i, [j]) for i, p in enumerate(prompts) for j, e in enumerate(endings)]
    meta = AttentionMetadata.for_lengths([len(seq) for seq, _, _ in jobs], causal=True)
    ids = torch.tensor([t for seq, _, _ in jobs for t in seq], device=lm.device)
    positions = torch.tensor([i for seq, _, _ in jobs for i in range(len(seq))], device=lm.device)
    hidden = lm.model(ids, positions, meta)
    out = torch.zeros(len(prompts), len(endings))
    for k, (_, i, wanted) in enumerate(jobs):
        first = meta.cu_seqlens[k] + len(prompts[i]) - 1  # the position that predicts an ending's first token
        for j in wanted:
            logp = torch.log_softmax(lm.model.compute_logits(hidden[first : first + len(endings[j])]).float(), -1)
            out[i, j] = float(logp.gather(1, torch.tensor(endings[j], device=lm.device)[:, None]).sum())
    return out


def _zero_shot_predictions(lm: LoadedModel, texts: list[str], labels: list[str], batch: int = 8) -> list[str]:
    """Each text's likeliest label word as the answer to the prompt."""
    endings = [lm.tokenizer.encode(label, add_special_tokens=False) for label in labels]
    if lm.tokenizer.chat_template is None:  # the label follows "Label:" after a space
        endings = [lm.tokenizer.encode(" " + label, add_special_tokens=False) for label in labels]
    out = []
    for start in range(0, len(texts), batch):
        prompts = [_prompt_ids(lm, t, labels) for t in texts[start : start + batch]]
        out.extend(labels[i] for i in _label_logprobs(lm, prompts, endings).argmax(-1).tolist())
    return out


def classify(lm: LoadedModel, examples: Sequence[Example]) -> ClassifyResult:
    """Predict every example's label and score the predictions against the gold labels."""
    if not examples:
        raise LmkError("no examples to classify")
    texts = [e.text for e in examples]
    gold = [e.label for e in examples]
    if lm.config.is_encoder or lm.config.is_classifier:  # a head: an encoder's, or a decoder's last token's
        if not lm.config.is_classifier:
            raise LmkError(f"{lm.source.path}: this encoder has no classification head "
                           "(expected a BertForSequenceClassification checkpoint)")
        labels = [lm.config.id2label[k] for k in sorted(lm.config.id2label)]
        unknown = sorted(set(gold) - set(labels))
        if unknown:
            raise LmkError(f"labels {unknown} in the data are not among the model's labels {labels}")
        predicted = _head_predictions(lm, texts)
    else:
        labels = sorted(set(gold))
        if len(labels) < 2:
            raise LmkError(f"zero-shot classification needs at least two labels in the data; found {labels}")
        predicted = _zero_shot_predictions(lm, texts, labels)
    accuracy, macro_f1 = scores(gold, predicted)
    return ClassifyResult(accuracy, macro_f1, len(examples), labels, predicted)
