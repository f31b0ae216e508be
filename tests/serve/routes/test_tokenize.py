"""vLLM's tokenizer routes through the app in-process: /tokenize of a text or a conversation (exactly one),
/detokenize within the vocabulary, /tokenizer_info as SmolLM2's tokenizer is, and all three need a model."""

from __future__ import annotations

import pytest

MODEL = "m"
KEY = "sk-tok"
MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]
VOCAB = 49152  # SmolLM2's vocabulary


@pytest.fixture(scope="module")
def client(app_client):
    with app_client() as c:
        yield c


def test_a_text_is_counted_in_the_tokenizers_ids(client, smollm):
    text = "Tokenizers split words into pieces."
    body = client.post("/tokenize", json={"prompt": text}).json()
    ids = smollm.tokenizer.encode(text)
    assert body == {"count": len(ids), "max_model_len": 64, "tokens": ids, "token_strs": None}


def test_a_conversation_without_the_generation_prompt_lacks_the_assistant_header(client, smollm):
    tok = smollm.tokenizer
    bare = client.post("/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False}).json()["tokens"]
    assert bare == tok.apply_chat_template(MESSAGES, add_generation_prompt=False, tokenize=True)
    prompted = client.post("/tokenize", json={"model": MODEL, "messages": MESSAGES}).json()["tokens"]
    assert prompted[:len(bare)] == bare and tok.decode(prompted[len(bare):]) == "<|im_start|>assistant\n"


@pytest.mark.parametrize("body", [{}, {"prompt": "x", "messages": MESSAGES}])
def test_exactly_one_of_prompt_and_messages(client, api_error, body):
    assert api_error(client.post("/tokenize", json=body), 400, "prompt") == "send exactly one of prompt and messages"


def test_a_model_named_must_be_served(client, api_error):
    for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
        message = api_error(client.post(path, json={**body, "model": "other"}), 404, "model", "model_not_found")
        assert message == "model 'other' does not exist; served: m"


def test_detokenize_takes_ids_of_the_vocabulary_only(client, api_error, smollm):
    assert client.post("/detokenize", json={"tokens": [VOCAB - 1]}).json() == {"prompt": smollm.tokenizer.decode([VOCAB - 1])}
    for bad in (VOCAB, -1):
        message = api_error(client.post("/detokenize", json={"tokens": [5, bad]}), 400, "tokens")
        assert message == f"token id {bad} is outside the vocabulary [0, {VOCAB})"


def test_tokenizer_info_is_smollm2s(client, smollm):
    assert client.get("/tokenizer_info").json() == {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "chat_template": smollm.tokenizer.chat_template,
        "model_max_length": 64, "vocab_size": VOCAB}


def test_without_a_generation_model_every_route_is_404(app_client, api_error):
    with app_client(generation=False) as c:
        for r in (c.post("/tokenize", json={"prompt": "x"}), c.post("/detokenize", json={"tokens": [1]}),
                  c.get("/tokenizer_info")):
            assert api_error(r, 404, "model") == "this server serves no generation model"


def test_keys_are_asked_for(app_client, api_error):
    with app_client(generation=False, api_keys=[KEY]) as c:
        for r in (c.post("/tokenize", json={"prompt": "x"}), c.post("/detokenize", json={"tokens": [1]}),
                  c.post("/tokenize", json={"prompt": "x"}, headers={"Authorization": "Bearer sk-wrong"}),
                  c.post("/tokenize", json={"prompt": 5}), c.post("/detokenize", json={"tokens": "x"}),
                  c.get("/tokenizer_info")):  # the key before the body: no 400 tells a keyless caller anything
            api_error(r, 401, code="invalid_api_key")
