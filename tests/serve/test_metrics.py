"""The server's Prometheus registry: engine gauges and counters read from `stats()` at scrape time."""

from __future__ import annotations

from lmkernel.serve.metrics import STEP_PHASES, Metrics


def _stats(**extra: float) -> dict[str, float]:
    stats = {"running": 2, "waiting": 1, "kv_blocks_free": 30, "kv_blocks_total": 40, "prefix_cache_hit_rate": 0.5,
             "preemptions": 3, "step_prompt_tokens": 100, "step_decode_tokens": 50, "step_prefill_steps": 4,
             "step_decode_steps": 9}
    stats |= {f"step_{p}_seconds": 0.25 for p in STEP_PHASES}
    return stats | extra


def _sample(text: str, name: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(name + " "))
    return float(line.split()[1])


def test_engine_gauges_and_counters_are_read_at_scrape_time() -> None:
    text = Metrics(lambda: _stats(), lambda: True).render().decode()
    assert _sample(text, "lmkernel_kv_cache_usage_ratio") == 0.25
    assert _sample(text, "lmkernel_preemptions_total") == 3
    assert _sample(text, "lmkernel_ready") == 1
    assert "lmkernel_spec_decode" not in text  # no speculation, no speculative counters


def test_speculative_decoding_counters_follow_the_engine() -> None:
    stats = _stats(spec_checks=10, spec_proposed_tokens=30, spec_accepted_tokens=21)
    text = Metrics(lambda: stats, lambda: True).render().decode()
    assert _sample(text, "lmkernel_spec_decode_num_drafts_total") == 10
    assert _sample(text, "lmkernel_spec_decode_num_draft_tokens_total") == 30
    assert _sample(text, "lmkernel_spec_decode_num_accepted_tokens_total") == 21
