"""`lmk generate` and `lmk chat`: text streamed to the terminal."""

from __future__ import annotations

from typing import Annotated

import typer

from lmkernel.cli import (Deterministic, Device, Dtype, KVMemory, Model, SpecModel, SpecTokens, app, err_console, fail,
                          speculative)
from lmkernel.errors import LmkError


def _open_llm(model: str, dtype: str, device: str, kv_cache_memory: str, spec: dict[str, object] | None = None,
              deterministic: bool = False):
    from lmkernel.engine.llm import LLM

    try:
        llm = LLM(model, dtype=dtype, device=device, kv_cache_memory=kv_cache_memory, speculative=spec,
                  deterministic=deterministic, verbose=False)
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
    if llm.engine is None:
        raise fail(LmkError(f"{model} is an encoder model; generate and chat need a decoder"))
    s = llm.stats()
    err_console.print(f"KV cache: {s['kv_blocks_total']} blocks x {s['kv_block_size']} tokens = {s['kv_cache_tokens']} tokens"
                      + ("" if s["speculative"] == "off" else f"; speculative decoding: {s['speculative']}"), highlight=False)
    return llm


def _stream(llm, prompt: str | list[int], params) -> str:
    """Run one request to the end, printing text as it arrives; returns the whole text."""
    engine = llm.engine
    try:
        engine.add_request("cli", prompt, params)
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
    text = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            piece = out.outputs[0].delta_text
            text += piece
            print(piece, end="", flush=True)
    print()
    return text


@app.command()
def generate(
    model: Model,
    prompt: Annotated[str, typer.Argument(help="text to continue")],
    max_tokens: Annotated[int, typer.Option(help="tokens to generate at most")] = 128,
    temperature: Annotated[float, typer.Option(help="0 for greedy decoding")] = 0.7,
    top_p: Annotated[float, typer.Option()] = 0.95,
    seed: Annotated[int | None, typer.Option(help="fix the random stream")] = None,
    dtype: Dtype = "auto",
    device: Device = "auto",
    kv_cache_memory: KVMemory = "512MiB",
    speculative_model: SpecModel = None,
    num_speculative_tokens: SpecTokens = 3,
    deterministic: Deterministic = False,
) -> None:
    """Stream a completion of PROMPT to the terminal."""
    from lmkernel.engine.sampling import SamplingParams

    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    except ValueError as exc:
        raise fail(exc) from None
    llm = _open_llm(model, dtype, device, kv_cache_memory, speculative(speculative_model, num_speculative_tokens),
                    deterministic)
    _stream(llm, prompt, params)
    if speculative_model is not None:
        s = llm.stats()
        err_console.print(f"speculative decoding: {s['spec_accepted_tokens']} of {s['spec_proposed_tokens']} proposed "
                          f"tokens accepted ({s['spec_acceptance_rate']:.0%}), {s['spec_tokens_per_check']:.2f} tokens "
                          "per checking forward", highlight=False)


@app.command()
def chat(
    model: Model = "smollm2-135m-instruct",
    system: Annotated[str | None, typer.Option(help="system message")] = None,
    max_tokens: Annotated[int, typer.Option()] = 256,
    temperature: Annotated[float, typer.Option()] = 0.7,
    dtype: Dtype = "auto",
    device: Device = "auto",
    kv_cache_memory: KVMemory = "512MiB",
    speculative_model: SpecModel = None,
    num_speculative_tokens: SpecTokens = 3,
    deterministic: Deterministic = False,
) -> None:
    """Chat with MODEL in the terminal; the conversation so far is the prompt. Ctrl-D or 'exit' quits."""
    from lmkernel.engine.sampling import SamplingParams

    llm = _open_llm(model, dtype, device, kv_cache_memory, speculative(speculative_model, num_speculative_tokens),
                    deterministic)
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line.strip() in ("exit", "quit"):
            return
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            prompt = llm.tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
        except (LmkError, ValueError) as exc:
            raise fail(exc) from None
        print("assistant> ", end="", flush=True)
        history.append({"role": "assistant", "content": _stream(llm, prompt, params)})
