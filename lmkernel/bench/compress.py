"""Every compressed variant of a model side by side, in one run: size on disk, resident memory,
quality (perplexity, or embedding cosine for an encoder) and speed.

The parent process builds each variant into a directory; each is then measured in a fresh child
process (`python -m lmkernel.bench.compress DIR ...`), so resident memory is that variant's alone.
The decoder variants' speeds are then timed in the parent, all loaded together and taken in turn
round after round, so every ratio compares runs from the same minutes of this shared, noisy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess  # nosec B404  # runs our own commands as argument lists, never a shell
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lmkernel.errors import LmkError
from lmkernel.layers.attention import AttentionMetadata
from lmkernel.loading import LoadedModel, load_model

DECODE_TOKENS = 64
PREFILL_TOKENS = 512
SPEED_ROUNDS = 3
PREFILL_REPEATS = 3  # a prefill is short: more tries per round against the machine's noise


@dataclass
class VariantResult:
    name: str
    size_bytes: int
    rss_bytes: int
    quality: float  # perplexity (decoders) or mean cosine to float32 (encoders)
    decode_b1: float  # tokens/s at batch 1 (encoders: sentences/s one at a time)
    decode_b16: float  # tokens/s over 16 requests (encoders: sentences/s in batches of 16)
    prefill: float  # prompt tokens/s in one 512-token pass (encoders: tokens/s in batches of 16)
    speedup: tuple[float, float, float] = (1.0, 1.0, 1.0)  # the three speeds against the first variant's

    def speeds(self) -> tuple[float, float, float]:
        return self.decode_b1, self.decode_b16, self.prefill


def resident_bytes() -> int:
    """This process's resident set size now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def size_on_disk(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _best(fn: Callable[[], float], rounds: int = 3) -> float:
    return min(fn() for _ in range(rounds))


def _prefill_seconds(lm: LoadedModel, ids: list[int]) -> float:
    """Seconds of one forward over `ids` as one prompt."""
    meta = AttentionMetadata.for_lengths([len(ids)], causal=not lm.config.is_encoder)
    x, pos = torch.tensor(ids, device=lm.device), torch.arange(len(ids), device=lm.device)
    start = time.perf_counter()
    with torch.inference_mode():
        lm.model(x, pos, meta)
    return time.perf_counter() - start


def _decode_seconds(engine: object, prompts: list[list[int]]) -> float:
    """Seconds per decode step of the engine running `prompts` (which fit one step) together, prefill excluded."""
    from lmkernel.engine.sampling import SamplingParams

    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=DECODE_TOKENS, ignore_eos=True))
    engine.step()  # every prompt fits one step's token budget: all prefilled, first tokens out
    start, steps = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    return (time.perf_counter() - start) / max(steps, 1)


def measure_decoder(path: Path, quantization: str | None, text: str, max_tokens: int) -> VariantResult:
    """Size, resident memory after a prefill, and perplexity (speeds: `time_decoders`)."""
    from lmkernel.eval.perplexity import perplexity

    lm = load_model(path, quantization=quantization)
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    _prefill_seconds(lm, ids[:PREFILL_TOKENS])
    rss = resident_bytes()
    ppl = perplexity(lm, text, max_tokens).perplexity
    return VariantResult(path.name, size_on_disk(path), rss, ppl, 0.0, 0.0, 0.0)


def time_decoders(variants: list[tuple[str, Path, str | None]], results: list[VariantResult], text: str,
                  log: Callable[[str], None], rounds: int = SPEED_ROUNDS) -> None:
    """Fill in the speeds of `results`: every variant loaded at once, each measurement taken for every
    variant in turn, `rounds` times (prefill `PREFILL_REPEATS` times a round). Speeds come from the
    median times; each speed-up is the median of the ratios of measurements taken back to back with the
    first variant's, so that a slow minute of the machine slows both sides of a ratio alike."""
    from lmkernel.engine.llm import LLM

    models = [load_model(path, quantization=quant) for _, path, quant in variants]
    engines = [LLM(lm, kv_cache_memory="256MiB", verbose=False).engine for lm in models]
    ids = models[0].tokenizer.encode(text, add_special_tokens=False)
    one, sixteen = [ids[:32]], [ids[i * 32 : i * 32 + 32] for i in range(16)]
    seconds: list[list[list[float]]] = [[[], [], []] for _ in variants]  # [variant][b1, b16, prefill][sample]
    for r in range(rounds):
        log(f"timing round {r + 1} of {rounds}")
        for _ in range(PREFILL_REPEATS):
            for i, lm in enumerate(models):
                seconds[i][2].append(_prefill_seconds(lm, ids[:PREFILL_TOKENS]))
        for i, engine in enumerate(engines):
            seconds[i][0].append(_decode_seconds(engine, one))
            seconds[i][1].append(_decode_seconds(engine, sixteen))
    work = (1, 16, PREFILL_TOKENS)  # tokens per measured second: one step of 1 or 16 requests, one prefill
    for result, own in zip(results, seconds):
        result.decode_b1, result.decode_b16, result.prefill = (n / statistics.median(t) for n, t in zip(work, own))
        result.speedup = tuple(statistics.median(b / t for b, t in zip(base, mine))  # type: ignore[assignment]
                               for base, mine in zip(seconds[0], own))


def measure_encoder(path: Path, sentences: list[str], reference: torch.Tensor) -> VariantResult:
    lm = load_model(path)
    lm.embed(sentences[:16])
    rss = resident_bytes()
    cosine = float(torch.nn.functional.cosine_similarity(lm.embed(sentences), reference, dim=-1).mean())

    def timed(batch: int) -> float:
        start = time.perf_counter()
        for i in range(0, len(sentences), batch):
            lm.embed(sentences[i : i + batch])
        return time.perf_counter() - start

    one = len(sentences) / _best(lambda: timed(1), 2)
    many_s = _best(lambda: timed(16), 2)
    tokens = sum(len(t) for t in lm.tokenizer.encode_batch(sentences))
    return VariantResult(path.name, size_on_disk(path), rss, cosine, one, len(sentences) / many_s, tokens / many_s)


def _child(args: list[str]) -> VariantResult:
    out = subprocess.run([sys.executable, "-m", "lmkernel.bench.compress", *args], capture_output=True, text=True,  # nosec B603  # an argument list this module builds, no shell
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode != 0:
        raise LmkError(f"measuring {args[0]} failed:\n{out.stderr[-2000:]}")
    return VariantResult(**json.loads(out.stdout.strip().splitlines()[-1]))


def build_decoder_variants(model: str, workdir: Path, text: str, calibration_windows: int,
                           log: Callable[[str], None]) -> list[tuple[str, Path, str | None]]:
    """(name, path, quantization) of every SmolLM2-style variant, written under `workdir`."""
    from lmkernel.compress.calibrate import calibration_sequences
    from lmkernel.compress.pipeline import QuantizeSettings, quantize_pipeline
    from lmkernel.compress.prune import prune_structured, prune_unstructured
    from lmkernel.loader.hf_export import save_model_dir
    from lmkernel.registry import resolve

    def save(lm: LoadedModel, name: str) -> Path:
        return save_model_dir(lm.model, lm.config, lm.tokenizer, lm.dtype, workdir / name, True)

    def windows(lm: LoadedModel) -> list[list[int]]:
        return calibration_sequences(lm, text, calibration_windows, start=8192)

    def quantized(name: str, settings: QuantizeSettings) -> Path:
        return quantize_pipeline(load_model(model, quantization=None), settings, workdir / name, windows, True, log=log).path

    variants: list[tuple[str, Path, str | None]] = []
    log("float32")
    variants.append(("float32", save(load_model(model, quantization=None), "float32"), None))
    log("bfloat16")
    variants.append(("bfloat16", save(load_model(model, dtype="bfloat16", quantization=None), "bfloat16"), None))
    log("int8")
    variants.append(("int8", quantized("int8", QuantizeSettings("int8")), None))
    log("int4-g128 (GPTQ, then scales/minimums refined against float32)")
    variants.append(("int4-g128", quantized("int4-g128", QuantizeSettings("int4", 128, "gptq")), None))
    source = resolve(model)
    if source.kind == "gguf":
        variants.append(("gguf-kept", source.path, "keep"))
    log("wanda 50%")
    lm = load_model(model, quantization=None)
    prune_unstructured(lm, "wanda", 0.5, windows(lm))
    variants.append(("wanda-50", save(lm, "wanda-50"), None))
    log("structured, 30% of FFN channels")
    lm = load_model(model, quantization=None)
    pruned, _ = prune_structured(lm, windows(lm), ffn=0.3)
    variants.append(("structured-ffn30", save(pruned, "structured-ffn30"), None))
    return variants


def run_decoder(model: str, workdir: Path, text_file: Path, max_tokens: int, calibration_windows: int,
                log: Callable[[str], None]) -> list[VariantResult]:
    text = text_file.read_text(encoding="utf-8")
    variants = build_decoder_variants(model, workdir, text, calibration_windows, log)
    results = []
    for name, path, quant in variants:
        log(f"measuring {name}")
        r = _child([str(path), "--kind", "decoder", "--text", str(text_file), "--max-tokens", str(max_tokens),
                    *(["--quantization", quant] if quant else [])])
        r.name = name
        results.append(r)
    time_decoders(variants, results, text, log)
    return results


def run_encoder(model: str, workdir: Path, sentences: list[str], log: Callable[[str], None]) -> list[VariantResult]:
    from lmkernel.compress.calibrate import calibration_sequences
    from lmkernel.compress.pipeline import QuantizeSettings, quantize_pipeline
    from lmkernel.compress.prune import prune_unstructured
    from lmkernel.loader.hf_export import save_model_dir

    def save(lm: LoadedModel, name: str) -> Path:
        return save_model_dir(lm.model, lm.config, lm.tokenizer, lm.dtype, workdir / name, True)

    reference = load_model(model, quantization=None)
    ref_file = workdir / "reference.pt"
    torch.save(reference.embed(sentences), ref_file)
    (workdir / "sentences.json").write_text(json.dumps(sentences))
    variants = [("float32", save(reference, "float32"))]
    variants.append(("bfloat16", save(load_model(model, dtype="bfloat16", quantization=None), "bfloat16")))
    for method in ("int8", "int8-dynamic", "int4"):
        settings = QuantizeSettings(method, 128, rounding="nearest", refine_steps=0)  # no calibration: round to nearest
        path = quantize_pipeline(load_model(model, quantization=None), settings, workdir / method, lambda lm: [], True).path
        variants.append((method if method != "int4" else "int4-g128", path))
    lm = load_model(model, quantization=None)
    prune_unstructured(lm, "wanda", 0.5, calibration_sequences(lm, "\n".join(sentences), 32))
    variants.append(("wanda-50", save(lm, "wanda-50")))
    results = []
    for name, path in variants:
        log(f"measuring {name}")
        r = _child([str(path), "--kind", "encoder", "--sentences", str(workdir / "sentences.json"), "--reference", str(ref_file)])
        r.name = name
        results.append(r)
    for r in results:
        r.speedup = tuple(mine / base for mine, base in zip(r.speeds(), results[0].speeds()))  # type: ignore[assignment]
    return results


def main(argv: list[str] | None = None) -> None:
    """Measure one variant in this (fresh) process; print its result as JSON."""
    p = argparse.ArgumentParser()
    p.add_argument("path", type=Path)
    p.add_argument("--kind", choices=("decoder", "encoder"), required=True)
    p.add_argument("--quantization")
    p.add_argument("--text", type=Path)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--sentences", type=Path)
    p.add_argument("--reference", type=Path)
    a = p.parse_args(argv)
    if a.kind == "decoder" and a.text is None:
        p.error("--kind decoder needs --text")
    if a.kind == "encoder" and (a.sentences is None or a.reference is None):
        p.error("--kind encoder needs --sentences and --reference")
    if a.kind == "decoder":
        r = measure_decoder(a.path, a.quantization, a.text.read_text(encoding="utf-8"), a.max_tokens)
    else:
        r = measure_encoder(a.path, json.loads(a.sentences.read_text()), torch.load(a.reference, weights_only=True))
    print(json.dumps(asdict(r)))


if __name__ == "__main__":
    main()
