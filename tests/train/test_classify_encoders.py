"""`lmk train --task classify` on the newer sentence encoders (all-mpnet-base-v2, nomic-embed-text-v1.5 from its
GGUF): a few steps of full fine-tuning on Financial PhraseBank, then the saved model read by transformers'
AutoModelForSequenceClassification gives the logits lmkernel gives. (EmbeddingGemma's head runs the same path on
a tiny checkpoint in tests/loader/test_hf_export_encoders.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from lmkernel.layers.attention import AttentionMetadata
from lmkernel.loading import load_model
from lmkernel.train.args import TrainArgs
from lmkernel.train.checkpoint import model_dir
from lmkernel.train.trainer import train
from shared_paths import SHARED_DATA

pytestmark = pytest.mark.slow  # full fine-tuning of 110M and 300M encoders: `make test` runs it, `make test-fast` does not

PHRASEBANK = SHARED_DATA / "financial-phrasebank"


@pytest.fixture(scope="module")
def phrasebank(tmp_path_factory):
    d = tmp_path_factory.mktemp("phrasebank")
    out = []
    for name, n in (("train.jsonl", 48), ("valid.jsonl", 24)):
        lines = (PHRASEBANK / name).read_text(encoding="utf-8").splitlines(keepends=True)[:n]
        (d / name).write_text("".join(lines), encoding="utf-8")
        out.append(d / name)
    return out


@pytest.mark.parametrize("alias", ["all-mpnet-base-v2", "nomic-embed-text-v1.5"])
def test_a_fine_tuned_encoder_classifies_as_transformers_reads_it(alias, phrasebank, tmp_path):
    from transformers import AutoModelForSequenceClassification

    args = TrainArgs(task="classify", model=alias, data=str(phrasebank[0]), eval_data=str(phrasebank[1]),
                     output=str(tmp_path / "run"), max_steps=4, batch_size=8, lr=3e-5, warmup=0, eval_every=4,
                     checkpointing=False, seed=0)
    base = load_model(alias, quantization=None).model.state_dict()
    assert train(args).steps == 4
    saved = model_dir(tmp_path / "run")
    ours = load_model(saved)
    assert ours.config.is_classifier and sorted(ours.config.id2label.values()) == ["negative", "neutral", "positive"]
    trained = ours.model.state_dict()
    top = max(k for k in trained if k.endswith(".weight") and k in base and ".11." in k)  # a weight of a late layer
    assert not torch.equal(trained[top], base[top]), top  # the encoder itself learned, not only its new head
    texts = [json.loads(line)["text"] for line in phrasebank[1].read_text().splitlines()[:8]]
    seqs = ours.tokenizer.encode_batch(texts)
    meta = AttentionMetadata.for_lengths([len(s) for s in seqs], causal=False)
    with torch.inference_mode():
        ids = torch.tensor([t for s in seqs for t in s])
        positions = torch.tensor([p for s in seqs for p in range(len(s))])
        got = ours.model.classify(ours.model(ids, positions, meta), meta)
        theirs = AutoModelForSequenceClassification.from_pretrained(saved).eval()
        expected = torch.cat([theirs(torch.tensor([s])).logits for s in seqs])
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-3)
