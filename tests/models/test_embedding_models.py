"""The embedding models users pick for retrieval, as pulled from PyPI, against their references on 64 Financial
PhraseBank sentences no test chose: EmbeddingGemma-300M and all-mpnet-base-v2 against sentence-transformers over
the same folders, nomic-embed-text-v1.5 (its F16 GGUF) against llama.cpp's embeddings of the same file (gpt4all's build)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmkernel import load_model
from lmkernel.errors import LmkError
from lmkernel.registry import ALIASES, alias_location

pytestmark = pytest.mark.slow  # three real models and their references: `make test` runs it, `make test-fast` does not

SENTENCES = slice(2000, 2064)


def _pulled(alias: str) -> Path:
    found = alias_location(ALIASES[alias])
    assert found is not None, f"{alias} is not pulled; `make test` runs `lmk pull {alias}`"
    return found


@pytest.fixture(scope="module")
def sentences(phrasebank_sentences) -> list[str]:
    return phrasebank_sentences[SENTENCES]


@pytest.fixture(scope="module")
def pair():
    """Ours and sentence-transformers' model of a pulled folder, each loaded once for the whole file."""
    from sentence_transformers import SentenceTransformer

    cache: dict[str, tuple] = {}

    def get(alias: str):
        if alias not in cache:
            folder = _pulled(alias)
            cache[alias] = (load_model(folder), SentenceTransformer(str(folder), device="cpu"))
        return cache[alias]

    return get


def _worst_cosine(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return F.cosine_similarity(ours.double(), theirs.double(), dim=-1).min().item()


@pytest.mark.parametrize("alias", ["embeddinggemma-300m", "all-mpnet-base-v2"])
def test_embeddings_match_sentence_transformers(alias, sentences, pair):
    ours, reference = pair(alias)
    expected = reference.encode(sentences, convert_to_tensor=True, batch_size=16)
    got = ours.embed(sentences)
    assert got.shape == expected.shape
    assert _worst_cosine(got, expected) >= 0.9999
    if ours.config.prompts:  # EmbeddingGemma: "query" / "document" prefixes
        for name in ("query", "document"):
            expected = reference.encode(sentences[:16], prompt_name=name, convert_to_tensor=True)
            assert _worst_cosine(ours.embed(sentences[:16], prompt_name=name), expected) >= 0.9999
        with pytest.raises(LmkError, match="prompt_name 'nope' is not one of this model's prompts"):
            ours.embed(sentences[:1], prompt_name="nope")


def test_embeddinggemma_attends_within_its_window_on_long_inputs(wikitext_lines, pair):
    """A text of 700 tokens: EmbeddingGemma's local layers see 256 tokens on either side (transformers'
    reading of its 512 window), global layers all; the reference runs the same text."""
    ours, reference = pair("embeddinggemma-300m")
    text = " ".join(wikitext_lines[1500:1560])
    ids = ours.tokenizer.encode(text)[:700]
    text = ours.tokenizer.decode(ids, skip_special_tokens=True)
    assert len(ours.tokenizer.encode(text)) > 600
    expected = reference.encode([text], convert_to_tensor=True)
    assert _worst_cosine(ours.embed([text]), expected) >= 0.9999


@pytest.fixture(scope="module")
def nomic():
    return load_model(_pulled("nomic-embed-text-v1.5"))


@pytest.fixture(scope="module")
def gpt4all_nomic():
    """llama.cpp as the gpt4all wheel bundles it (pip installs it in seconds; llama-cpp-python builds for minutes)."""
    from gpt4all import Embed4All

    path = _pulled("nomic-embed-text-v1.5")
    return Embed4All(path.name, model_path=str(path.parent), allow_download=False, device="cpu", n_threads=2)


def test_nomic_gguf_matches_llama_cpp(nomic, gpt4all_nomic, sentences):
    """All 64 sentences at the full 768 (the model), and 8 at every size v1.5 was trained for (the cut: gpt4all
    cuts as nomic does, layer norm, cut, L2)."""
    assert nomic.config.architecture == "nomic_bert" and nomic.config.matryoshka
    for dimensions, texts in ((768, sentences), (256, sentences[:8]), (64, sentences[:8])):
        expected = torch.tensor(gpt4all_nomic.embed(texts, prefix="search_query", dimensionality=dimensions))
        ours = nomic.embed(texts, prompt_name="query", dimensions=dimensions)
        assert ours.shape == (len(texts), dimensions)
        assert _worst_cosine(ours, expected) >= 0.9999, dimensions


def test_nomic_gguf_written_as_a_directory_embeds_as_transformers_reads_it(nomic, sentences, tmp_path):
    """The GGUF's model written in transformers' NomicBertModel names; transformers' own implementation, mean
    pooled, gives our embeddings, and lmkernel reads the directory back to the same."""
    from transformers import NomicBertModel

    from lmkernel.loader.hf_export import save_model_dir

    dense = load_model(_pulled("nomic-embed-text-v1.5"), quantization=None)  # a directory holds float weights
    out = save_model_dir(dense.model, dense.config, dense.tokenizer, torch.float32, tmp_path / "nomic")
    theirs = NomicBertModel.from_pretrained(out).eval()
    texts = sentences[:8]
    with torch.inference_mode():
        expected = torch.cat([theirs(torch.tensor([ids])).last_hidden_state.mean(1)
                              for ids in nomic.tokenizer.encode_batch(["search_query: " + t for t in texts])])
    assert _worst_cosine(nomic.embed(texts, prompt_name="query"), expected) >= 0.9999
    again = load_model(out)
    assert again.config.prompts == nomic.config.prompts and again.config.matryoshka_layer_norm
    torch.testing.assert_close(again.embed(texts, prompt_name="query", dimensions=64),
                               nomic.embed(texts, prompt_name="query", dimensions=64), atol=1e-5, rtol=0)


def test_nomic_without_dimensions_is_the_plain_mean_and_cuts_with_a_layer_norm(nomic, sentences):
    """No `dimensions`: the L2-normalised mean, as sentence-transformers and llama.cpp give it; with `dimensions`,
    nomic's recipe, which differs from a plain cut."""
    full = nomic.embed(sentences[:8], prompt_name="document")
    torch.testing.assert_close(full.norm(dim=-1), torch.ones(8))
    cut = nomic.embed(sentences[:8], prompt_name="document", dimensions=256)
    assert cut.shape == (8, 256)
    torch.testing.assert_close(cut.norm(dim=-1), torch.ones(8))
    torch.testing.assert_close(cut, F.normalize(F.layer_norm(full, (768,))[:, :256], dim=-1), atol=1e-5, rtol=0)
    assert (cut - F.normalize(full[:, :256], dim=-1)).abs().max() > 1e-4  # the mean it takes away is small
    with pytest.raises(LmkError, match="dimensions must be an integer from 1 to the model's 768"):
        nomic.embed(sentences[:1], dimensions=769)


def test_embeddinggemma_cuts_without_a_layer_norm(sentences, pair):
    """EmbeddingGemma is cut as sentence-transformers' `truncate_dim` does: the first values, L2 again."""
    ours, reference = pair("embeddinggemma-300m")
    expected = reference.encode(sentences[:8], convert_to_tensor=True, truncate_dim=128)
    assert _worst_cosine(ours.embed(sentences[:8], dimensions=128), F.normalize(expected, dim=-1)) >= 0.9999


def test_v1_embeddings_takes_a_prompt_name_and_dimensions(nomic, sentences):
    """`/v1/embeddings` with nomic: `prompt_name` puts the model's prefix before each text and `dimensions` cuts
    and normalises, both as `LLM.embed` does; a prompt the model lacks and a size past its width are 400s."""
    from fastapi.testclient import TestClient

    from lmkernel.engine.async_embedder import AsyncEmbedder
    from lmkernel.serve.app import ServerConfig, build_app

    ours = nomic
    app = build_app(ServerConfig(model_name=None, embedding_model_name="nomic"), None, AsyncEmbedder(ours))
    texts = sentences[:4]
    with TestClient(app) as client:
        r = client.post("/v1/embeddings", json={"model": "nomic", "input": texts, "prompt_name": "query", "dimensions": 128})
        bad_prompt = client.post("/v1/embeddings", json={"model": "nomic", "input": texts, "prompt_name": "poem"})
        too_wide = client.post("/v1/embeddings", json={"model": "nomic", "input": texts, "dimensions": 1024})
    assert r.status_code == 200, r.text
    got = torch.tensor([d["embedding"] for d in r.json()["data"]])
    torch.testing.assert_close(got, ours.embed(texts, prompt_name="query", dimensions=128), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, ours.embed(texts, dimensions=128), atol=1e-3)  # the prefix changed them
    assert bad_prompt.status_code == 400 and bad_prompt.json()["error"]["param"] == "prompt_name"
    assert "query" in bad_prompt.json()["error"]["message"]
    assert too_wide.status_code == 400 and too_wide.json()["error"]["param"] == "dimensions"
