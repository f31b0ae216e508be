"""Crash consistency: each long-running command is killed (SIGKILL) at seeded random moments and run again
with the same arguments, as a user would after a power cut; after every kill nothing half-written may sit
under a final name, and after the rerun the result must be the one an uninterrupted run gives (training:
the same final weights, bit for bit; a batch: every id exactly once, each answer the reference's)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import signal
import subprocess  # nosec B404  # runs lmk itself as argument lists, never a shell
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file

LMK = [sys.executable, "-m", "lmkernel.cli"]


@dataclass
class Case:
    """A command under test: its arguments in a work directory (`again`: the rerun after a kill), what must hold
    after a kill, and what must hold once the rerun finished, against an uninterrupted reference run."""

    name: str
    command: Callable[[Path, bool], list[str]]
    after_kill: Callable[[Path], list[str]]
    after_rerun: Callable[[Path, Path], list[str]]
    prepare: Callable[[Path], None] = lambda work: None
    env: Callable[[Path], dict[str, str]] = lambda work: {}


@dataclass
class Row:
    """One command's campaign: kill points, how many hit it while it ran, reruns that ended right."""

    name: str
    kill_points: int = 0
    killed_running: int = 0
    reruns: int = 0
    reruns_correct: int = 0
    reference_seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True,  # nosec B603  # lmk itself
                          timeout=timeout)


def _kill_after(argv: list[str], cwd: Path, env: dict[str, str], seconds: float) -> bool:
    """Start the command and SIGKILL it after `seconds`; whether it was still running then."""
    child = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **env}, stdout=subprocess.DEVNULL,  # nosec B603  # lmk itself
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        child.wait(seconds)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # its whole group: torch's and pip's children too
        child.wait()
        return True


def campaign(case: Case, root: Path, kill_points: int, kills_per_trial: int, seed: int, timeout: float = 1800) -> Row:
    """`kill_points` kills in trials of `kills_per_trial`, each trial ending in a rerun to completion."""
    rng = random.Random(f"{case.name}:{seed}")  # nosec B311  # seeded kill moments, not a secret
    row = Row(case.name)
    reference = root / f"{case.name}-reference"
    shutil.rmtree(reference, ignore_errors=True)
    reference.mkdir(parents=True)
    case.prepare(reference)
    start = time.monotonic()
    done = _run(case.command(reference, False), reference, case.env(reference), timeout)
    row.reference_seconds = time.monotonic() - start
    if done.returncode != 0:
        row.problems.append(f"the uninterrupted run failed: {done.stderr[-500:]}")
        return row
    for trial in range(math.ceil(kill_points / kills_per_trial)):
        work = root / f"{case.name}-{trial}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        case.prepare(work)
        for k in range(min(kills_per_trial, kill_points - row.kill_points)):
            at = rng.uniform(0.05, 1.0) * row.reference_seconds
            row.kill_points += 1
            row.killed_running += _kill_after(case.command(work, k > 0), work, case.env(work), at)
            row.problems += [f"trial {trial}, kill {k} at {at:.1f} s: {p}" for p in case.after_kill(work)]
        rerun = _run(case.command(work, True), work, case.env(work), timeout)
        row.reruns += 1
        problems = [f"rerun failed: {rerun.stderr[-400:]}"] if rerun.returncode != 0 else case.after_rerun(work, reference)
        row.problems += [f"trial {trial}: {p}" for p in problems]
        row.reruns_correct += not problems
        shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(reference, ignore_errors=True)
    return row


# -- the commands ---------------------------------------------------------------------------------------------

def _tensors(directory: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _same_tensors(a: Path, b: Path) -> list[str]:
    import torch

    ta, tb = _tensors(a), _tensors(b)
    if set(ta) != set(tb):
        return [f"{a}: other tensors than the reference ({len(ta)} against {len(tb)})"]
    differ = [n for n in ta if not torch.equal(ta[n], tb[n])]  # type: ignore[arg-type]
    return [f"{a}: {len(differ)} tensors differ from the reference's, e.g. {differ[0]}"] if differ else []


BATCH_REQUESTS = 48


def batch_case(model: str = "smollm2-135m-instruct") -> Case:
    """`lmk batch` over chat and completion lines, deterministic: after a kill the output holds whole lines only,
    and after the rerun every id once with the answer an uninterrupted run gives."""
    def prepare(work: Path) -> None:
        lines = []
        for i in range(BATCH_REQUESTS):
            body = ({"model": model, "messages": [{"role": "user", "content": f"Name a colour, then the number {i}."}],
                     "max_tokens": 24, "temperature": 0} if i % 2 else
                    {"model": model, "prompt": f"Item {i} of the list:", "max_tokens": 24, "temperature": 0})
            url = "/v1/chat/completions" if i % 2 else "/v1/completions"
            lines.append(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": url, "body": body}))
        (work / "in.jsonl").write_text("\n".join(lines) + "\n")

    def command(work: Path, again: bool) -> list[str]:
        return [*LMK, "batch", "in.jsonl", "-o", "out.jsonl", "--model", model, "--kv-cache-memory", "64MiB",
                "--concurrency", "8", "--deterministic"]

    def lines(work: Path) -> list[dict]:
        path = work / "out.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    def after_kill(work: Path) -> list[str]:
        path = work / "out.jsonl"
        if not path.exists():
            return []
        text = path.read_text()
        whole = text if text.endswith("\n") or not text else text[: text.rfind("\n") + 1]
        try:
            [json.loads(x) for x in whole.splitlines()]
        except json.JSONDecodeError:
            return ["a complete line of out.jsonl is not JSON"]
        return []  # a torn last line is allowed: the rerun cuts it off before appending

    def after_rerun(work: Path, reference: Path) -> list[str]:
        got, want = lines(work), lines(reference)
        ids = [x["custom_id"] for x in got]
        if sorted(ids) != sorted(x["custom_id"] for x in want) or len(set(ids)) != len(ids):
            return [f"ids in the output: {len(ids)}, distinct {len(set(ids))}; expected each of {len(want)} once"]

        def answer(x: dict) -> str:
            body = x["response"]["body"]
            choice = body["choices"][0]
            return choice.get("text") if "text" in choice else choice["message"]["content"]

        by_id = {x["custom_id"]: answer(x) for x in want}
        differ = [x["custom_id"] for x in got if answer(x) != by_id[x["custom_id"]]]
        return [f"answers differ from the uninterrupted run's: {differ[:5]}"] if differ else []

    return Case("lmk batch", command, after_kill, after_rerun, prepare)


def train_case(data: Path, valid: Path) -> Case:
    """`lmk train` (a classifier on MiniLM, checkpoints every 2 steps), rerun with --resume: the final weights
    must be the uninterrupted run's bit for bit, and every checkpoint under its final name complete."""
    def command(work: Path, again: bool) -> list[str]:
        resume = again and any((work / "run" / "checkpoints").glob("step-*/position.json"))
        fresh = not resume and (work / "run").exists()
        if fresh:  # killed before its first checkpoint: nothing to resume, start over
            shutil.rmtree(work / "run")
        return [*LMK, "train", "--task", "classify", "--model", "all-minilm-l6-v2", "--data", str(data), "--eval",
                str(valid), "-o", "run", "--epochs", "3", "--batch-size", "8", "--lr", "2e-4", "--warmup", "0",
                "--eval-every", "4", "--save-every", "2", "--seed", "0", "--no-checkpointing",
                *(["--resume"] if resume else [])]

    def after_kill(work: Path) -> list[str]:
        problems = []
        for step in (work / "run" / "checkpoints").glob("step-*"):
            if not all((step / f).is_file() for f in ("trainable.safetensors", "state.pt", "position.json")):
                problems.append(f"checkpoint {step.name} is incomplete under its final name")
        model = work / "run" / "model"
        if model.exists() and not (model / "config.json").is_file():
            problems.append("run/model exists without its config.json")
        return problems

    def after_rerun(work: Path, reference: Path) -> list[str]:
        return _same_tensors(work / "run" / "model", reference / "run" / "model")

    return Case("lmk train", command, after_kill, after_rerun)


def quantize_case(model: str = "smollm2-135m-instruct") -> Case:
    """`lmk quantize --method int8`: the output directory is absent or complete after a kill; after the rerun
    (the same command: a complete output is kept) its tensors are the uninterrupted run's."""
    def command(work: Path, again: bool) -> list[str]:
        if again and (work / "out" / "config.json").is_file():  # finished before the kill: a rerun has nothing to do
            return [sys.executable, "-c", "pass"]
        return [*LMK, "quantize", model, "--method", "int8", "-o", "out"]

    def after_kill(work: Path) -> list[str]:
        out = work / "out"
        if out.exists() and not ((out / "config.json").is_file() and list(out.glob("*.safetensors"))):
            return ["out/ exists but is not a complete model directory"]
        return []

    def after_rerun(work: Path, reference: Path) -> list[str]:
        return _same_tensors(work / "out", reference / "out")

    return Case("lmk quantize", command, after_kill, after_rerun)


def pull_case(alias: str = "qwen2.5-coder-0.5b-instruct") -> Case:
    """`lmk pull` into an empty model cache: after a kill no file under the model's name unless it is the whole,
    checksummed file; after the rerun the file's sha256 is the registry's."""
    from lmkernel.registry import ALIASES

    entry = ALIASES[alias]

    def env(work: Path) -> dict[str, str]:
        return {"LMK_HOME": str(work / "home")}

    def command(work: Path, again: bool) -> list[str]:
        return [*LMK, "pull", alias]

    def final(work: Path) -> Path:
        return work / "home" / "models" / entry.relative_path

    def digest(path: Path) -> str:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(8 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def after_kill(work: Path) -> list[str]:
        path = final(work)
        if path.exists() and (path.stat().st_size != entry.size or digest(path) != entry.sha256):
            return [f"{path.name} sits under its final name but is not the whole file"]
        return []

    def after_rerun(work: Path, reference: Path) -> list[str]:
        path = final(work)
        return [] if path.is_file() and digest(path) == entry.sha256 else [f"{path} missing or not the registry's file"]

    return Case("lmk pull", command, after_kill, after_rerun, env=env)


def tune_case(config_text: str) -> Case:
    """`lmk tune` (3 trials of a tiny LoRA classifier, no final model): a rerun keeps every finished trial and
    runs only what is missing; the study ends with its 3 trials, each finished one recorded once."""
    def prepare(work: Path) -> None:
        (work / "tune.yaml").write_text(config_text.replace("OUTPUT", str(work / "tune")), encoding="utf-8")

    def command(work: Path, again: bool) -> list[str]:
        return [*LMK, "tune", "tune.yaml", "--trials", "3", "--no-final"]

    def trials(work: Path) -> list[dict]:
        path = work / "tune" / "trials.jsonl"
        if not path.exists():
            return []
        return [json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")]

    seen: dict[Path, int] = {}

    def after_kill(work: Path) -> list[str]:
        count = len([t for t in trials(work) if t.get("state") in ("complete", "pruned")])
        lost = seen.get(work, 0) - count
        seen[work] = count
        return [f"{lost} finished trials lost by the kill"] if lost > 0 else []

    def after_rerun(work: Path, reference: Path) -> list[str]:
        got = trials(work)
        numbers = [t["trial"] for t in got]
        finished = [t for t in got if t.get("state") in ("complete", "pruned")]
        if len(finished) != 3 or len(set(numbers)) != len(numbers):  # killed trials stay, marked unfinished
            return [f"the study holds trials {[(t['trial'], t.get('state')) for t in got]}; expected 3 finished, each once"]
        return []

    return Case("lmk tune", command, after_kill, after_rerun, prepare)


def recommend_case() -> Case:
    """`lmk recommend fit` on MovieLens-100k (a short encoder fine-tuning): the recommender directory is absent or
    complete after a kill; after the rerun it loads and scores what an uninterrupted fit scores."""
    from lmkernel.apps.recommend_data import movielens_100k

    inter, items = movielens_100k()

    def command(work: Path, again: bool) -> list[str]:
        if again and (work / "rec" / "recommender.json").is_file():  # finished before the kill
            return [sys.executable, "-c", "pass"]
        return [*LMK, "recommend", "fit", "--interactions", str(inter), "--items", str(items), "-o", "rec",
                "--encoder-steps", "10", "--encoder-batch-size", "32", "--seed", "0"]

    def after_kill(work: Path) -> list[str]:
        rec = work / "rec"
        parts = ("recommender.json", "vectors.npy", "ranker.txt", "items.jsonl", "encoder/config.json")
        if rec.exists() and not all((rec / p).is_file() for p in parts):
            return ["rec/ exists but is not a complete recommender"]
        return []

    def after_rerun(work: Path, reference: Path) -> list[str]:
        from lmkernel.apps.recommend_store import Recommender

        Recommender.load(work / "rec")
        got = json.loads((work / "rec" / "recommender.json").read_text())["test"]
        want = json.loads((reference / "rec" / "recommender.json").read_text())["test"]
        return [] if got == want else [f"test metrics {got} differ from the uninterrupted fit's {want}"]

    return Case("lmk recommend fit", command, after_kill, after_rerun)


def cases(root: Path, phrasebank: Path) -> dict[str, Callable[[], Case]]:
    """Every command's case by its `--command` name, after writing into `root` the few PhraseBank sentences (32 to
    train on, 16 to evaluate) that the training and tuning cases read."""
    train = root / "train.jsonl"
    valid = root / "valid.jsonl"
    root.mkdir(parents=True, exist_ok=True)
    train.write_text("".join((phrasebank / "train.jsonl").read_text().splitlines(keepends=True)[:32]))
    valid.write_text("".join((phrasebank / "valid.jsonl").read_text().splitlines(keepends=True)[:16]))
    tune_config = (f"task: classify\nmodel: all-minilm-l6-v2\ndata: {train}\nholdout: 0.25\noutput: OUTPUT\nmax_steps: 2\n"
                   "eval_every: 1\nwarmup: 0\ncheckpointing: false\nlora: r=4,alpha=8\nsearch:\n  lr: [0.0001, 0.001]\n"
                   "  batch_size: [8]\n  epochs: [1, 1]\n  warmup: [0, 0]\n  lora_r: [2, 4]\n")
    return {"batch": batch_case, "train": lambda: train_case(train, valid), "quantize": quantize_case,
            "pull": pull_case, "recommend": recommend_case, "tune": lambda: tune_case(tune_config)}
