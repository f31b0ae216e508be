"""API keys and per-key rate limits (requests per minute and tokens per minute, token buckets)."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lmkernel.errors import LmkError
from lmkernel.serve.protocol import APIError


def key_hash(key: str | None) -> str | None:
    """What logs and metrics may show of a key: a short SHA-256 prefix, never the key."""
    return None if key is None else hashlib.sha256(key.encode()).hexdigest()[:12]


SECRET_FLAGS = ("--api-key",)


def masked_argv(argv: Sequence[str]) -> list[str]:
    """`argv` with the value of every secret flag (`--api-key K` and `--api-key=K`) replaced by ***."""
    out: list[str] = []
    hide = False
    for arg in argv:
        if hide:
            out.append("***")
            hide = False
        elif arg in SECRET_FLAGS:
            out.append(arg)
            hide = True
        elif arg.partition("=")[0] in SECRET_FLAGS and "=" in arg:
            out.append(arg.partition("=")[0] + "=***")
        else:
            out.append(arg)
    return out


def hide_keys_from_process_title(argv: Sequence[str]) -> None:
    """Rewrite this process's title (what `ps` and /proc/PID/cmdline show) with API keys masked."""
    masked = masked_argv(argv)
    if masked != list(argv):
        import setproctitle

        setproctitle.setproctitle(" ".join(masked))


def read_keys_file(path: Path) -> list[str]:
    """One key per line; blank lines and lines starting with # are skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise LmkError(f"--api-keys-file {path}: cannot read it ({exc.strerror})") from None
    keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise LmkError(f"--api-keys-file {path}: no keys in it (expected one key per line)")
    return keys


@dataclass
class TokenBucket:
    """Holds up to `capacity` units and refills at capacity per minute."""

    capacity: float
    clock: Callable[[], float] = time.monotonic
    level: float = field(init=False)
    updated: float = field(init=False)

    def __post_init__(self) -> None:
        self.level, self.updated = self.capacity, self.clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.capacity / 60.0)
        self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` units are there (0 if they are now); inf if it exceeds the capacity."""
        self._refill()
        if amount > self.capacity:
            return float("inf")
        return max(0.0, (amount - self.level) * 60.0 / self.capacity)

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= amount


class Gatekeeper:
    """Checks the key of each request and charges its rate limits; no keys configured means open access."""

    def __init__(self, keys: Iterable[str], requests_per_minute: int | None = None, tokens_per_minute: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.keys = [k.encode() for k in keys]
        self.rpm, self.tpm, self.clock = requests_per_minute, tokens_per_minute, clock
        self.buckets: dict[str | None, tuple[TokenBucket | None, TokenBucket | None]] = {}

    def authenticate(self, authorization: str | None) -> str | None:
        """The caller's key (None when access is open); 401 when keys are set and this one is not among them."""
        if not self.keys:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not any(hmac.compare_digest(token.strip().encode(), k) for k in self.keys):
            raise APIError(401, "invalid API key", code="invalid_api_key")
        return token.strip()

    def charge(self, key: str | None, tokens: int) -> None:
        """Take one request and `tokens` tokens from the key's buckets, or raise 429 with Retry-After."""
        if self.rpm is None and self.tpm is None:
            return
        if key not in self.buckets:
            self.buckets[key] = (
                TokenBucket(self.rpm, self.clock) if self.rpm else None,
                TokenBucket(self.tpm, self.clock) if self.tpm else None,
            )
        requests, tokens_bucket = self.buckets[key]
        waits = [b.wait_for(n) for b, n in ((requests, 1), (tokens_bucket, tokens)) if b is not None]
        wait = max(waits, default=0.0)
        if wait == float("inf"):
            raise APIError(429, f"this request needs {tokens} tokens, more than the limit of {self.tpm} tokens per minute",
                           code="rate_limit_exceeded", headers={"Retry-After": "60"})
        if wait > 0:
            raise APIError(429, f"rate limit reached ({self.rpm or '-'} requests/min, {self.tpm or '-'} tokens/min); "
                           f"retry in {wait:.1f} s", code="rate_limit_exceeded", headers={"Retry-After": str(int(wait) + 1)})
        for bucket, n in ((requests, 1), (tokens_bucket, tokens)):
            if bucket is not None:
                bucket.take(n)
