"""Classification metrics, a classification head that predicts as transformers does, zero-shot
labels from SmolLM2 on obvious sentences, and clear errors for bad data (`lmk eval classify` on the
Financial PhraseBank: tests/cli/test_eval.py)."""

from __future__ import annotations

import random
import shutil

import pytest
import torch

from lmkernel.errors import LmkError
from lmkernel.eval.classify import Example, classify, read_examples, scores
from lmkernel.loading import load_model

LABELS = ["negative", "neutral", "positive"]


def test_scores_match_scikit_learn() -> None:
    from sklearn.metrics import accuracy_score, f1_score

    rng = random.Random(0)
    gold = [rng.choice(LABELS) for _ in range(200)]
    predicted = [g if rng.random() < 0.6 else rng.choice(LABELS[:2]) for g in gold]
    accuracy, macro_f1 = scores(gold, predicted)
    assert accuracy == pytest.approx(accuracy_score(gold, predicted), abs=1e-12)
    assert macro_f1 == pytest.approx(f1_score(gold, predicted, average="macro"), abs=1e-12)
    assert scores(["a", "b"], ["a", "b"]) == (1.0, 1.0)


def test_classification_head_predicts_as_transformers(minilm_dir, phrasebank_valid, tmp_path) -> None:
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(0)
    hf = BertForSequenceClassification.from_pretrained(
        minilm_dir, num_labels=3, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)}
    ).eval()
    out = tmp_path / "minilm-classifier"
    hf.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(minilm_dir / name, out / name)
    examples = [Example(r["text"], r["label"]) for r in phrasebank_valid[:48]]
    result = classify(load_model(out), examples)

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    with torch.inference_mode():
        batch = tok([e.text for e in examples], padding=True, truncation=True, return_tensors="pt")
        theirs = [LABELS[i] for i in hf(**batch).logits.argmax(-1).tolist()]
    assert result.predictions == theirs
    assert (result.accuracy, result.macro_f1) == scores([e.label for e in examples], theirs)
    assert result.labels == LABELS


OBVIOUS = [
    ("I love this phone, it is wonderful and works perfectly.", "positive"),
    ("This is terrible. The product broke on the first day and I hate it.", "negative"),
    ("Profits soared to a record high and the shares jumped 20 percent.", "positive"),
    ("The company went bankrupt and thousands of workers lost their jobs.", "negative"),
    ("What a fantastic, delightful experience; best purchase ever!", "positive"),
    ("Awful service, rude staff, and the food was disgusting.", "negative"),
]


def test_zero_shot_gets_obvious_sentiment_right(smollm) -> None:
    result = classify(smollm, [Example(text, label) for text, label in OBVIOUS])
    print(f"SmolLM2 zero-shot on obvious sentences: {result.predictions}")
    assert result.labels == ["negative", "positive"]
    assert result.accuracy >= 5 / 6


def test_bad_data_is_refused_with_the_line(minilm, tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "positive"}\n{"text": "broken"\n')
    with pytest.raises(LmkError, match="line 2: not JSON"):
        read_examples(bad)
    bad.write_text('{"text": "fine", "label": "positive"}\n\n{"label": "negative"}\n')
    with pytest.raises(LmkError, match="line 3: expected an object with a string 'text'"):
        read_examples(bad)
    bad.write_text("\n")
    with pytest.raises(LmkError, match="no examples"):
        read_examples(bad)
    with pytest.raises(LmkError, match="no classification head"):
        classify(minilm, [Example("text", "positive")])
