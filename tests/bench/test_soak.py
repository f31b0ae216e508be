"""The soak in short (`lmk bench soak` runs 30 minutes on the 1.5B): SmolLM2 and MiniLM behind `lmk serve`, six
clients for 30 s of every kind of request, then SIGTERM."""

from __future__ import annotations

import pytest

from lmkernel.bench.soak import KINDS, soak

pytestmark = pytest.mark.slow  # a real server under load: make test runs it, make test-fast does not


def test_mixed_traffic_gets_no_5xx_only_expected_4xx_and_leaves_the_cache_empty(tmp_path) -> None:
    r = soak("smollm2-135m-instruct", "all-minilm-l6-v2", 30, 6, tmp_path, "128MiB")
    assert r.server_errors == 0 and not r.unexpected() and not r.errors, (r.unexpected(), r.errors[:10])
    assert set(r.counts) == set(KINDS)  # every kind was sent, adapters loaded, used and unloaded
    assert r.counts["adapter"][200] >= 3
    assert r.kv_free == r.kv_total and r.exit_code == 0
    warm, end = r.warm(), r.samples[-1]  # descriptors and threads steady once warm (pools made on first use)
    assert end.fds <= warm.fds + 8 and end.threads <= warm.threads + 4, (warm, end)
    work = r.work_by_third()  # the server generated in every third, and its CPU time was counted
    assert len(work) == 3 and all(w.tokens_per_s > 0 and w.cpu_ms_per_token > 0 and 0 <= w.steal < 1 and w.probe_gflops > 0
                                  for w in work), work
