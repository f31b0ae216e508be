"""Multiple-choice accuracy by log-likelihood, as lm-evaluation-harness scores `multiple_choice` tasks.

Each choice is the continuation `" " + choice` of the question's prompt; its score is the sum of the
log-probabilities of its tokens, and the best-scored choice is the answer. Tokens are split as the
harness splits them (the prompt's trailing spaces move to the continuation; the continuation's tokens
are those of prompt + continuation past the prompt's own), and each (prompt, choice) runs through the
engine as its own request, as the harness sends them to a server one at a time, so the log-likelihoods
are the ones `lmk serve` returns for the same requests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lmkernel.engine.llm import LLM
from lmkernel.engine.sampling import SamplingParams
from lmkernel.errors import LmkError


@dataclass(frozen=True)
class Question:
    prompt: str
    choices: list[str]
    answer: int  # index into choices


@dataclass(frozen=True)
class ChoiceResult:
    accuracy: float
    questions: int
    loglikelihoods: list[list[float]]  # per question, per choice
    predictions: list[int]


def read_questions(path: Path, template: str, answer_field: str, choices: list[str] | None,
                   choices_field: str | None) -> list[Question]:
    """Questions from JSON lines: the prompt is `template` filled with the line's fields (str.format),
    the choices fixed (`choices`) or the line's `choices_field`, the answer the line's `answer_field`
    (a choice's text or its index)."""
    if (choices is None) == (choices_field is None):
        raise LmkError("give exactly one of --choices and --choices-field")
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise LmkError(f"{path}: cannot read ({exc.strerror})") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LmkError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise LmkError(f"{where}: expected a JSON object")
        try:
            prompt = template.format(**row)
        except KeyError as exc:
            raise LmkError(f"{where}: the template needs field {exc}, which the line lacks") from None
        options = choices if choices is not None else row.get(choices_field)
        if not isinstance(options, list) or not options or not all(isinstance(c, str) for c in options):
            raise LmkError(f"{where}: field '{choices_field}' must be a non-empty list of strings")
        answer = row.get(answer_field)
        if isinstance(answer, str) and answer in options:
            answer = options.index(answer)
        if not isinstance(answer, int) or not 0 <= answer < len(options):
            raise LmkError(f"{where}: field '{answer_field}' must be one of the choices or its index; got {answer!r}")
        out.append(Question(prompt, list(options), answer))
    if not out:
        raise LmkError(f"{path}: no questions")
    return out


def split_tokens(llm: LLM, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) split as lm-evaluation-harness splits them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    encode = llm.tokenizer.encode
    whole, head = encode(context + continuation, add_special_tokens=False), encode(context, add_special_tokens=False)
    return head, whole[len(head):]


def loglikelihood(llm: LLM, context: str, continuation: str) -> float:
    head, tail = split_tokens(llm, context, continuation)
    if not head or not tail:
        raise LmkError(f"cannot score {continuation!r} after {context!r}: both need at least one token")
    out = llm.generate([head + tail], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    ids = head + tail
    return sum(out.prompt_logprobs[i][ids[i]].logprob for i in range(len(head), len(ids)))


def multiple_choice(llm: LLM, questions: list[Question]) -> ChoiceResult:
    scores = [[loglikelihood(llm, q.prompt, " " + c) for c in q.choices] for q in questions]
    predictions = [max(range(len(s)), key=s.__getitem__) for s in scores]
    correct = sum(p == q.answer for p, q in zip(predictions, questions))
    return ChoiceResult(correct / len(questions), len(questions), scores, predictions)
