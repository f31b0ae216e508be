"""Redaction of personal data from logged prompts, and the one JSON line per request."""

from __future__ import annotations

import json
import logging

from lmkernel.serve.logs import log_request, luhn_ok, redact


def test_luhn() -> None:
    assert luhn_ok("4539578763621486") and not luhn_ok("4539578763621487")


def test_redacts_each_kind() -> None:
    text = ("Mail jane.doe@example.com, call +44 20 7946 0958, card 4539 5787 6362 1486, "
            "IBAN GB82 WEST 1234 5698 7654 32, SSN 123-45-6789, NI number AB 12 34 56 C.")
    out = redact(text)
    for secret in ("jane.doe@example.com", "7946 0958", "4539 5787 6362 1486", "GB82 WEST", "123-45-6789", "AB 12 34 56 C"):
        assert secret not in out
    for tag in ("[EMAIL]", "[PHONE]", "[CARD]", "[IBAN]", "[NATIONAL_ID]"):
        assert tag in out


def test_keeps_what_is_not_personal() -> None:
    text = "Revenue rose 12% to EUR 1,234 in 2024; order 4539 5787 6362 1487 is not a valid card."
    assert redact(text) == text


def test_prompts_only_when_asked_and_redacted(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="lmkernel.requests"):
        log_request({"id": "1", "status": 200}, "mail me at a@b.io", "ok")
        log_request({"id": "2", "status": 200}, "mail me at a@b.io", "ok", log_prompts=True)
    first, second = (json.loads(r.getMessage()) for r in caplog.records)
    assert "prompt" not in first and first["id"] == "1"
    assert second["prompt"] == "mail me at [EMAIL]"
