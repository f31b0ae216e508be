"""`lmk eval ...`: perplexity, embedding fidelity, classification and multiple choice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lmkernel.cli import Device, Dtype, Model, Quantization, app, console, fail, quantization_arg
from lmkernel.errors import LmkError


def report(line: str, result: dict[str, float | int], json_out: bool) -> None:
    """Print a result for people, and with --json as one JSON object on the last line for scripts."""
    console.print(line)
    if json_out:
        print(json.dumps(result))


eval_app = typer.Typer(help="Measure a model: perplexity, embedding fidelity, classification.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@eval_app.command("perplexity")
def eval_perplexity(
    model: Model,
    data: Annotated[Path, typer.Option(help="a UTF-8 text file")],
    max_tokens: Annotated[int | None, typer.Option(help="score only the first N tokens")] = None,
    window: Annotated[int | None, typer.Option(help="context per window (default: the model's)")] = None,
    dtype: Dtype = "float32",
    device: Device = "auto",
    quantization: Quantization = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object as the last line")] = False,
) -> None:
    """Sliding-window perplexity (stride half the window) of a causal LM over a text file."""
    from lmkernel.eval.perplexity import perplexity, read_text
    from lmkernel.loading import load_model

    try:
        text = read_text(data)
        if max_tokens is not None and max_tokens < 2:
            raise LmkError(f"--max-tokens must be at least 2; got {max_tokens}")
        lm = load_model(model, dtype=dtype, device=device, quantization=quantization_arg(quantization))
        result = perplexity(lm, text, max_tokens, window)
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
    report(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens",
           {"perplexity": result.perplexity, "tokens": result.tokens}, json_out)


@eval_app.command("embeddings")
def eval_embeddings(
    model: Model,
    reference: Annotated[str, typer.Option(help="the encoder to compare against")],
    data: Annotated[Path, typer.Option(help="a text file, one sentence per line")],
    dtype: Dtype = "float32",
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object as the last line")] = False,
) -> None:
    """Mean and minimum cosine similarity of MODEL's sentence embeddings to REFERENCE's (float32)."""
    from lmkernel.eval.embeddings import embedding_fidelity, read_lines
    from lmkernel.loading import load_model

    try:
        texts = read_lines(data)
        result = embedding_fidelity(load_model(model, dtype=dtype), load_model(reference), texts)
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
    report(f"{result.sentences} sentences: mean cosine {result.mean_cosine:.6f}, min {result.min_cosine:.6f}",
           {"mean_cosine": result.mean_cosine, "min_cosine": result.min_cosine}, json_out)


@eval_app.command("retrieval")
def eval_retrieval(
    model: Model,
    data: Annotated[Path, typer.Option(help="a text file of paragraphs, one a line (e.g. WikiText-2)")],
    limit: Annotated[int | None, typer.Option(help="use only the first N paragraphs")] = None,
    prompts: Annotated[bool, typer.Option(help="put the model's 'query' / 'document' prefixes first, if it has them")] = True,
    dtype: Dtype = "float32",
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object as the last line")] = False,
) -> None:
    """Recall@1, recall@10 and MRR@10 of a sentence encoder finding each paragraph's continuation from its first
    sentence, among the continuations of all the paragraphs."""
    from lmkernel.eval.perplexity import read_text
    from lmkernel.eval.retrieval import continuation_task, evaluate_retrieval
    from lmkernel.loading import load_model

    try:
        task = continuation_task(read_text(data), limit)
        lm = load_model(model, dtype=dtype)
        named = lm.config.prompts if prompts else {}
        result = evaluate_retrieval(lm, task, "query" if "query" in named else None,
                                    "document" if "document" in named else None)
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
    report(f"{result.queries} queries over {result.documents} documents: recall@1 {result.recall_at_1:.4f}, "
           f"recall@10 {result.recall_at_10:.4f}, MRR@10 {result.mrr_at_10:.4f}",
           {"recall_at_1": result.recall_at_1, "recall_at_10": result.recall_at_10, "mrr_at_10": result.mrr_at_10,
            "queries": result.queries}, json_out)


@eval_app.command("classify")
def eval_classify(
    model: Model,
    data: Annotated[Path, typer.Option(help='a JSONL file of {"text": ..., "label": ...} objects')],
    limit: Annotated[int | None, typer.Option(help="classify only the first N examples")] = None,
    noise: Annotated[float, typer.Option(help="typos per letter (swaps, drops, doubled letters), seeded: a noised copy")] = 0.0,
    noise_seed: Annotated[int, typer.Option(help="the seed of --noise")] = 0,
    dtype: Dtype = "float32",
    device: Device = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object as the last line")] = False,
) -> None:
    """Accuracy and macro-F1: with the model's classification head, or zero-shot for a causal LM."""
    from lmkernel.eval.classify import classify, read_examples, with_typos
    from lmkernel.loading import load_model

    try:
        if limit is not None and limit < 1:
            raise LmkError(f"--limit must be at least 1; got {limit}")
        if not 0 <= noise < 1:
            raise LmkError(f"--noise must be a rate in [0, 1); got {noise}")
        examples = read_examples(data)[:limit]
        examples = with_typos(examples, noise, noise_seed) if noise else examples
        result = classify(load_model(model, dtype=dtype, device=device), examples)
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
    report(f"{result.examples} examples, labels {', '.join(result.labels)}: accuracy {result.accuracy:.4f}, "
           f"macro-F1 {result.macro_f1:.4f}", {"accuracy": result.accuracy, "macro_f1": result.macro_f1}, json_out)


@eval_app.command("choice")
def eval_choice(
    model: Model,
    data: Annotated[Path, typer.Option(help="a JSONL file of questions")],
    template: Annotated[str, typer.Option(help="the prompt, with {field} for the line's fields")],
    answer_field: Annotated[str, typer.Option(help="the field holding the answer: a choice or its index")] = "answer",
    choices: Annotated[str | None, typer.Option(help="the same choices for every line, comma-separated")] = None,
    choices_field: Annotated[str | None, typer.Option(help="the field holding each line's list of choices")] = None,
    limit: Annotated[int | None, typer.Option(help="only the first N questions")] = None,
    quantization: Quantization = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object as the last line")] = False,
) -> None:
    """Multiple-choice accuracy by log-likelihood of each choice, as lm-evaluation-harness scores it."""
    from lmkernel.engine.llm import LLM
    from lmkernel.eval.choice import multiple_choice, read_questions

    try:
        if limit is not None and limit < 1:
            raise LmkError(f"--limit must be at least 1; got {limit}")
        fixed = [c.strip() for c in choices.split(",")] if choices is not None else None
        questions = read_questions(data, template.replace("\\n", "\n"), answer_field, fixed, choices_field)[:limit]
        llm = LLM(model, kv_cache_memory="256MiB", verbose=False, quantization=quantization_arg(quantization))
        result = multiple_choice(llm, questions)
    except (LmkError, ValueError) as exc:
        raise fail(exc) from None
    report(f"{result.questions} questions: accuracy {result.accuracy:.4f}",
           {"accuracy": result.accuracy, "questions": result.questions, "loglikelihoods": result.loglikelihoods}, json_out)
