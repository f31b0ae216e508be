"""vLLM's tokenizer endpoints at the server root (lm-evaluation-harness's remote tokenizer reads them):
POST /tokenize, POST /detokenize, GET /tokenizer_info."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from lmkernel.errors import LmkError
from lmkernel.loader.tokenizer import Tokenizer
from lmkernel.serve.checks import Service, service
from lmkernel.serve.protocol import APIError, DetokenizeRequest, TokenizeRequest
from lmkernel.serve.responses import DetokenizeResponse, TokenizeResponse, TokenizerInfo, documented

router = APIRouter()


def _tokenizer(svc: Service, model: str | None) -> Tokenizer:
    """The served model's tokenizer (a 404 for a model not served)."""
    if model is not None:
        svc.check_model(model, "generate")
    return svc.tokenizer


@router.post("/tokenize", **documented(TokenizeRequest, TokenizeResponse))
async def tokenize(request: Request) -> dict[str, Any]:
    svc = service(request)
    svc.authenticate(request)  # the key first: a caller without one learns nothing of what it sent
    body = await svc.parse(request, TokenizeRequest)
    tok = _tokenizer(svc, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "send exactly one of prompt and messages", "prompt")
    if body.prompt is not None:
        ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    else:
        try:
            ids = tok.apply_chat_template([{"role": m.role, "content": m.text()} for m in body.messages],
                                          add_generation_prompt=body.add_generation_prompt, tokenize=True)
        except (LmkError, ValueError) as exc:
            raise APIError(400, str(exc), "messages") from None
    strs = [tok.id_to_token(t) for t in ids] if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": svc.generator().max_model_len, "tokens": ids, "token_strs": strs}


@router.post("/detokenize", **documented(DetokenizeRequest, DetokenizeResponse))
async def detokenize(request: Request) -> dict[str, Any]:
    svc = service(request)
    svc.authenticate(request)
    body = await svc.parse(request, DetokenizeRequest)
    tok = _tokenizer(svc, body.model)
    vocab = svc.generator().vocab_size
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", "tokens")
    return {"prompt": tok.decode(body.tokens)}


@router.get("/tokenizer_info", **documented(None, TokenizerInfo))
async def tokenizer_info(request: Request) -> dict[str, Any]:
    svc = service(request)
    svc.authenticate(request)
    tok = _tokenizer(svc, None)
    specials = {name: tok.special_tokens.get(name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "chat_template": tok.chat_template,
            "model_max_length": svc.generator().max_model_len, "vocab_size": tok.vocab_size}
