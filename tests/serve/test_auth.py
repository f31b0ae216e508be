"""Keys and token-bucket rate limits, without a server."""

from __future__ import annotations

import pytest

from lmkernel.errors import LmkError
from lmkernel.serve.auth import Gatekeeper, TokenBucket, key_hash, read_keys_file
from lmkernel.serve.protocol import APIError


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_open_access_without_keys() -> None:
    assert Gatekeeper([]).authenticate(None) is None


def test_keys_are_checked() -> None:
    gate = Gatekeeper(["sk-a"])
    assert gate.authenticate("Bearer sk-a") == "sk-a"
    for header in (None, "sk-a", "Bearer ", "Bearer sk-b", "Basic sk-a"):
        with pytest.raises(APIError) as err:
            gate.authenticate(header)
        assert err.value.status == 401


def test_key_hash_hides_the_key() -> None:
    assert key_hash("sk-secret") != key_hash("sk-other") and "secret" not in key_hash("sk-secret")


def test_bucket_refills_per_minute() -> None:
    clock = Clock()
    bucket = TokenBucket(60, clock)
    bucket.take(60)
    assert bucket.wait_for(1) == pytest.approx(1.0)
    clock.now = 30
    assert bucket.wait_for(30) == 0 and bucket.wait_for(31) == pytest.approx(1.0)
    assert bucket.wait_for(61) == float("inf")


def test_requests_and_tokens_per_minute_per_key() -> None:
    clock = Clock()
    gate = Gatekeeper(["a", "b"], requests_per_minute=2, tokens_per_minute=100, clock=clock)
    gate.charge("a", 10)
    gate.charge("a", 10)
    with pytest.raises(APIError) as err:
        gate.charge("a", 10)
    assert err.value.status == 429 and err.value.headers["Retry-After"] == "31"
    gate.charge("b", 90)  # another key has its own buckets
    with pytest.raises(APIError):
        gate.charge("b", 20)
    with pytest.raises(APIError) as err:
        gate.charge("b", 500)
    assert "more than the limit" in err.value.message
    clock.now = 60
    gate.charge("a", 10)


def test_keys_file(tmp_path) -> None:
    f = tmp_path / "keys"
    f.write_text("# comment\n sk-1 \n\nsk-2\n")
    assert read_keys_file(f) == ["sk-1", "sk-2"]
    f.write_text("# nothing\n")
    with pytest.raises(LmkError, match="no keys"):
        read_keys_file(f)
    with pytest.raises(LmkError, match="cannot read"):
        read_keys_file(tmp_path / "missing")
