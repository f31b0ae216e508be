"""`lmk generate` and `lmk chat`: text streamed to the terminal."""

from __future__ import annotations

from typing import Annotated

import typer

from lmkernel.cli import Model, app, err_console, fail
from lmkernel.cli.options import config_options
from lmkernel.config import EngineConfig
from lmkernel.errors import LmkError


def _open_llm(model: str, engine: EngineConfig):
    from lmkernel.engine.llm import LLM

    try:
        llm = LLM(model, engine, verbose=False)
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
@config_options(EngineConfig, "engine", defaults={"kv_cache_memory": "512MiB"})
def generate(
    engine: EngineConfig,
    model: Model,
    prompt: Annotated[str, typer.Argument(help="text to continue")],
    max_tokens: Annotated[int, typer.Option(help="tokens to generate at most")] = 128,
    temperature: Annotated[float, typer.Option(help="0 for greedy decoding")] = 0.7,
    top_p: Annotated[float, typer.Option()] = 0.95,
) -> None:
    """Stream a completion of PROMPT to the terminal."""
    from lmkernel.engine.sampling import SamplingParams

    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p)
    except ValueError as exc:
        raise fail(exc) from None
    llm = _open_llm(model, engine)
    _stream(llm, prompt, params)
    if engine.speculative is not None:
        s = llm.stats()
        err_console.print(f"speculative decoding: {s['spec_accepted_tokens']} of {s['spec_proposed_tokens']} proposed "
                          f"tokens accepted ({s['spec_acceptance_rate']:.0%}), {s['spec_tokens_per_check']:.2f} tokens "
                          "per checking forward", highlight=False)


@app.command()
@config_options(EngineConfig, "engine", defaults={"kv_cache_memory": "512MiB"})
def chat(
    engine: EngineConfig,
    model: Model = "smollm2-135m-instruct",
    system: Annotated[str | None, typer.Option(help="system message")] = None,
    max_tokens: Annotated[int, typer.Option()] = 256,
    temperature: Annotated[float, typer.Option()] = 0.7,
) -> None:
    """Chat with MODEL in the terminal; the conversation so far is the prompt. Ctrl-D or 'exit' quits."""
    from lmkernel.engine.sampling import SamplingParams

    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
    except ValueError as exc:
        raise fail(exc) from None
    llm = _open_llm(model, engine)
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
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
