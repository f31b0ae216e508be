"""`lmk batch`: an OpenAI Batch API file through the engine offline; bad lines as per-line errors; resuming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import invoke

from lmkernel.cluster.batch import parse_line, read_requests, written_ids

MODEL = "smollm2-135m-instruct"
ENCODER = "all-minilm-l6-v2"


def chat(i: int, content: str, **extra: object) -> dict:
    return {"custom_id": f"chat-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0,
                     **extra}}


def write_lines(path: Path, lines: list[dict | str]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines), encoding="utf-8")
    return path


def results(path: Path) -> dict[str, dict]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        obj = json.loads(line)
        key = obj["custom_id"] if obj["error"] is None or "line" not in obj["error"] else f"line {obj['error']['line']}"
        assert key not in out, f"{key} written twice"
        out[key] = obj
    return out


def test_lines_that_are_not_requests_become_error_results() -> None:
    assert parse_line(1, json.dumps(chat(0, "hi")), "in.jsonl").custom_id == "chat-0"
    cases = [("{", "not JSON"), ("[1]", "expected a JSON object"), ('{"url": "/v1/completions"}', '"custom_id"'),
             (json.dumps({**chat(1, "x"), "method": "GET"}), '"method" must be "POST"'),
             (json.dumps({**chat(2, "x"), "url": "/v1/models"}), '"url" must be one of'),
             (json.dumps({**chat(3, "x"), "body": "text"}), '"body", a JSON object'),
             (json.dumps(chat(4, "x", stream=True)), "stream")]
    for text, message in cases:
        out = parse_line(7, text, "in.jsonl")
        assert isinstance(out, dict) and out["response"] is None, text
        assert out["error"]["line"] == 7 and out["error"]["message"].startswith("in.jsonl:7: ") and message in out["error"]["message"]


def test_resume_skips_written_results_and_cuts_a_torn_line(tmp_path: Path) -> None:
    source = write_lines(tmp_path / "in.jsonl", [chat(0, "a"), chat(1, "b"), "oops", chat(0, "again"), chat(2, "c")])
    requests, errors = read_requests(source, set())
    assert [r.custom_id for r in requests] == ["chat-0", "chat-1", "chat-2"]
    assert [e["error"]["line"] for e in errors] == [3, 4] and errors[1]["error"]["code"] == "duplicate_custom_id"
    out = tmp_path / "out.jsonl"
    done_line = json.dumps({"id": "b1", "custom_id": "chat-1", "response": {"status_code": 200}, "error": None})
    out.write_text(done_line + "\n" + json.dumps(errors[0]) + "\n" + '{"id": "b2", "custom_')
    done = written_ids(out)
    assert done == {"chat-1", "line 3"} and out.read_text().endswith("}\n")  # the torn line is gone
    requests, errors = read_requests(source, done)
    assert [r.custom_id for r in requests] == ["chat-0", "chat-2"] and [e["error"]["line"] for e in errors] == [4]
    (tmp_path / "junk.jsonl").write_text("not a result\n")
    with pytest.raises(Exception, match="junk.jsonl:1: the output file has a line that is not a batch result"):
        written_ids(tmp_path / "junk.jsonl")


@pytest.mark.slow
def test_a_batch_file_runs_offline_and_resumes(tmp_path: Path) -> None:
    lines = [chat(i, f"Name {i + 1} colours.") for i in range(6)] + [
        {"custom_id": "complete", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}},  # no "model": the served one
        {"custom_id": "embed", "method": "POST", "url": "/v1/embeddings", "body": {"model": ENCODER, "input": ["a", "b"]}},
        {**chat(90, "x"), "custom_id": "bad-max-tokens", "body": {**chat(90, "x")["body"], "max_tokens": -1}},
        {**chat(91, "x"), "custom_id": "other-model", "body": {**chat(91, "x")["body"], "model": "gpt-4o"}},
        "not json",
        {**chat(92, 'Reply with JSON {"ok": true}.'), "custom_id": "json",
         "body": {**chat(92, "x")["body"], "response_format": {"type": "json_object"}, "max_tokens": 12}},
    ]
    source = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    run = invoke("batch", str(source), "-o", str(out), "--embedding-model", ENCODER, "--kv-cache-memory", "64MiB")
    assert run.returncode == 0, run.stderr
    got = results(out)
    assert set(got) == {f"chat-{i}" for i in range(6)} | {"complete", "embed", "bad-max-tokens", "other-model", "line 11", "json"}
    for i in range(6):
        body = got[f"chat-{i}"]["response"]["body"]
        assert got[f"chat-{i}"]["response"]["status_code"] == 200 and body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] and body["usage"]["completion_tokens"] <= 8
        assert got[f"chat-{i}"]["id"].startswith("batch_req_") and got[f"chat-{i}"]["error"] is None
    assert got["complete"]["response"]["body"]["model"] == MODEL and got["complete"]["response"]["body"]["choices"][0]["text"]
    vectors = got["embed"]["response"]["body"]["data"]
    assert len(vectors) == 2 and len(vectors[0]["embedding"]) == 384
    assert got["bad-max-tokens"]["response"]["status_code"] == 400
    assert got["bad-max-tokens"]["response"]["body"]["error"]["param"] == "max_tokens"
    assert got["other-model"]["response"]["status_code"] == 404 and got["line 11"]["response"] is None
    json.loads(got["json"]["response"]["body"]["choices"][0]["message"]["content"])  # structured output held
    assert "wrote 12 results" in run.stderr and "3 with an error" in run.stderr
    # Interrupted after five results (the sixth half-written): the rerun completes it, nothing twice.
    kept = out.read_text().splitlines()[:5]
    out.write_text("\n".join(kept) + "\n" + '{"id": "batch_req_x", "cu')
    again = invoke("batch", str(source), "-o", str(out), "--embedding-model", ENCODER, "--kv-cache-memory", "64MiB")
    assert again.returncode == 0, again.stderr
    assert "7 lines to run, 5 already" in again.stderr
    resumed = results(out)
    assert set(resumed) == set(got)
    for i in range(6):  # greedy: the same text either way
        assert resumed[f"chat-{i}"]["response"]["body"]["choices"][0]["message"]["content"] == \
            got[f"chat-{i}"]["response"]["body"]["choices"][0]["message"]["content"]
    done = invoke("batch", str(source), "-o", str(out), "--embedding-model", ENCODER)
    assert done.returncode == 0 and "0 lines to run, 12 already" in done.stderr


@pytest.mark.slow
def test_bad_invocations_are_refused_clearly(tmp_path: Path) -> None:
    out = invoke("batch", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o.jsonl"))
    assert out.returncode == 1 and "missing.jsonl: no such input file" in out.stderr
    source = write_lines(tmp_path / "in.jsonl", [{"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
                                                  "body": {"model": ENCODER, "input": "x"}}])
    out = invoke("batch", str(source), "-o", str(tmp_path / "o.jsonl"))
    assert out.returncode == 1 and "--embedding-model" in out.stderr
    out = invoke("batch", str(source), "-o", str(source))
    assert out.returncode == 1 and "the same file as the input" in out.stderr


@pytest.mark.slow
def test_ray_data_with_two_actors_gives_the_one_process_results(tmp_path: Path) -> None:
    """200 lines (chat, completions, embeddings) on a local Ray with two actors, against the one-process run (greedy)."""
    topics = ["rivers", "planets", "bread", "chess", "rain", "violins", "bridges", "owls", "glass", "tea"]
    lines: list[dict | str] = []
    for i in range(200):
        if i % 10 == 9:
            lines.append({"custom_id": f"embed-{i}", "method": "POST", "url": "/v1/embeddings",
                          "body": {"model": ENCODER, "input": f"A short note about {topics[i % 10]}, number {i}."}})
        elif i % 10 == 8:
            lines.append({"custom_id": f"complete-{i}", "method": "POST", "url": "/v1/completions",
                          "body": {"model": MODEL, "prompt": f"Three facts about {topics[i % 10]}:", "max_tokens": 8,
                                   "temperature": 0}})
        else:
            lines.append({**chat(i, f"Say one thing about {topics[i % 10]} in {i % 7 + 3} words."), "custom_id": f"chat-{i}"})
    source = write_lines(tmp_path / "in.jsonl", lines)
    flags = ["--embedding-model", ENCODER, "--kv-cache-memory", "128MiB"]
    local = invoke("batch", str(source), "-o", str(tmp_path / "local.jsonl"), *flags)
    assert local.returncode == 0, local.stderr
    on_ray = invoke("batch", str(source), "-o", str(tmp_path / "ray.jsonl"), *flags, "--ray", "--replicas", "2")
    assert on_ray.returncode == 0, on_ray.stderr
    assert "answered by 2 Ray actors" in on_ray.stderr
    a, b = results(tmp_path / "local.jsonl"), results(tmp_path / "ray.jsonl")
    assert set(a) == set(b) == {line["custom_id"] for line in lines if isinstance(line, dict)}
    for key in a:
        assert a[key]["response"]["status_code"] == b[key]["response"]["status_code"] == 200, key
        body_a, body_b = a[key]["response"]["body"], b[key]["response"]["body"]
        if key.startswith("embed"):
            assert body_a["data"][0]["embedding"] == pytest.approx(body_b["data"][0]["embedding"], abs=1e-5)
        elif key.startswith("complete"):
            assert body_a["choices"][0]["text"] == body_b["choices"][0]["text"], key
        else:
            assert body_a["choices"][0]["message"] == body_b["choices"][0]["message"], key
