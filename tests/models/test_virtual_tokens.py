"""models/virtual_tokens.py: a prompt of real tokens' embeddings, or a prefix of their keys and values, is those
tokens laid before every sequence, as transformers computes it (tiny_llama, a tiny BERT classifier); the
defaults draw their start from the model; what cannot run is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from model_checks import flatten, load_dir, perturb_vectors

from lmkernel.models.virtual_tokens import PrefixTuned, PromptTuned

SEQS = [[5, 90, 17, 200, 33, 8, 140], [60, 7, 251]]
PROMPT = [41, 3, 177]
LABELS = {0: "negative", 1: "neutral", 2: "positive"}


@pytest.fixture(scope="module")
def llama(tiny_llama, tmp_path_factory):
    """Our Llama holding tiny_llama's weights (each test wraps a copy: the wrappers hook the model)."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama.save_pretrained(directory, safe_serialization=True)
    return load_dir(directory)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny random BertForSequenceClassification and ours read from its save."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(5)
    config = BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                        max_position_embeddings=64, initializer_range=0.2, id2label=LABELS,
                        label2id={v: k for k, v in LABELS.items()})
    reference = perturb_vectors(BertForSequenceClassification(config), 0.3)
    directory = tmp_path_factory.mktemp("tiny-bert")
    reference.save_pretrained(directory, safe_serialization=True)
    return reference, load_dir(directory)


def _logits(model) -> list[torch.Tensor]:
    ids, positions, meta = flatten(SEQS, causal=True)
    with torch.inference_mode():
        return list(model.compute_logits(model(ids, positions, meta)).split([len(s) for s in SEQS]))


def _after_prompt(tiny_llama) -> list[torch.Tensor]:
    """transformers' logits of each sequence's tokens with PROMPT's tokens before them."""
    with torch.inference_mode():
        return [tiny_llama(torch.tensor([PROMPT + s])).logits[0, len(PROMPT):] for s in SEQS]


def _keys_and_values(tiny_llama, ids: list[int]) -> torch.Tensor:
    """PEFT's prefix layout of transformers' cache for `ids`: per layer, its keys then its values [n, kv_heads * d]."""
    with torch.inference_mode():
        cache = tiny_llama(torch.tensor([ids]), use_cache=True).past_key_values
    cols = [t[0].transpose(0, 1).reshape(len(ids), -1) for layer in cache.layers for t in (layer.keys, layer.values)]
    return torch.cat(cols, dim=1)


def test_a_prompt_of_token_embeddings_is_those_tokens_before_each_sequence(llama, tiny_llama):
    init = tiny_llama.model.embed_tokens.weight.detach()[PROMPT]
    tuned = PromptTuned(copy.deepcopy(llama), len(PROMPT), init)
    assert tuned.num_virtual_tokens == 3 and tuned.kind == "prompt"
    for got, expected in zip(_logits(tuned), _after_prompt(tiny_llama)):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_a_prefix_of_cached_keys_and_values_is_those_tokens_before_each_sequence(llama, tiny_llama):
    """The prefix holds keys as attention stores them (rotated at positions 0..n-1); the tokens sit at n, n+1, ..."""
    init = _keys_and_values(tiny_llama, PROMPT)
    assert init.shape == (3, 2 * 2 * 2 * 64)
    tuned = PrefixTuned(copy.deepcopy(llama), len(PROMPT), init)
    for got, expected in zip(_logits(tuned), _after_prompt(tiny_llama)):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_a_prefix_starts_from_random_tokens_keys_and_values(llama, tiny_llama):
    torch.manual_seed(7)
    drawn = torch.randint(0, llama.config.vocab_size, (4,)).tolist()
    torch.manual_seed(7)
    tuned = PrefixTuned(copy.deepcopy(llama), 4)
    torch.testing.assert_close(tuned.prompt_embeddings.detach(), _keys_and_values(tiny_llama, drawn), atol=1e-5, rtol=1e-4)


def test_a_prompt_starts_from_rows_of_the_vocabulary(llama):
    table = llama.model.embed_tokens.weight
    tuned = PromptTuned(copy.deepcopy(llama), 5)
    assert tuned.prompt_embeddings.shape == (5, 256) and tuned.prompt_embeddings.requires_grad
    assert (tuned.prompt_embeddings[:, None] == table[None]).all(-1).any(-1).all()


def test_an_encoder_prompt_is_read_by_the_classifier_and_pooled_with_the_tokens(bert):
    """An encoder returns every row, prompt included: the classifier sees the first prompt token, as PEFT's does."""
    reference, ours = bert[0], copy.deepcopy(bert[1])
    types = [[0] * 4 + [1] * 3, [0, 0, 1]]
    tuned = PromptTuned(ours, len(PROMPT), reference.bert.embeddings.word_embeddings.weight.detach()[PROMPT])
    ids, positions, meta = flatten(SEQS, causal=False)
    with torch.inference_mode():
        hidden = tuned(ids, positions, meta, token_type_ids=torch.tensor([t for s in types for t in s]))
        labels, pooled = tuned.classify(hidden, meta), tuned.pool(hidden, meta)
        theirs = [reference(torch.tensor([PROMPT + s]), token_type_ids=torch.tensor([[0] * 3 + t]), output_hidden_states=True)
                  for s, t in zip(SEQS, types)]
    assert hidden.shape == (3 + 7 + 3 + 3, 32)
    torch.testing.assert_close(labels, torch.cat([o.logits for o in theirs]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pooled, torch.stack([o.hidden_states[-1][0].mean(0) for o in theirs]), atol=1e-5, rtol=1e-4)
    assert tuned.classifier is ours.classifier
    tuned.checkpoint_layers = True
    assert ours.checkpoint_layers and tuned.checkpoint_layers
    with pytest.raises(ValueError, match="a prompt-tuned encoder has no masked-LM scores"):
        tuned.mlm_logits(hidden)


def test_what_cannot_run_is_refused(llama, bert):
    tuned = PromptTuned(copy.deepcopy(llama), 2)
    ids, positions, meta = flatten(SEQS, causal=True)
    with pytest.raises(ValueError, match="a prompt-tuned model runs whole sequences, not through a paged KV cache"):
        tuned(ids, positions, meta, kv_caches=[])
    with pytest.raises(ValueError, match="prefix tuning runs on Llama-family decoders; this is a bert model"):
        PrefixTuned(bert[1], 2)
    with pytest.raises(ValueError, match=r"prefix embeddings are \(2, 256\); this model needs \[2, 512\]"):
        PrefixTuned(copy.deepcopy(llama), 2, torch.zeros(2, 256))
    with pytest.raises(ValueError, match="_NoTable has no word-embedding table to put a prompt before"):
        PromptTuned(_NoTable(llama.config), 2)


class _NoTable(torch.nn.Module):
    """A model whose only embedding table is not the vocabulary's."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.types = torch.nn.Embedding(2, 8)
