"""One JSON line per request, with personal data redacted from any prompt or output that is logged."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

log = logging.getLogger("lmkernel.requests")

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,3})?\b")
_CARD = re.compile(r"\b\d(?:[ -]?\d){12,18}\b")
_US_SSN = re.compile(r"\b\d{3}-\d{2}-\d{4}\b")
_UK_NINO = re.compile(r"\b[A-CEGHJ-PR-TW-Z]{2} ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b")
_PHONE = re.compile(r"(?<![\w])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){2,4}(?![\w])")


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum that every payment card number satisfies."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _iban_ok(candidate: str) -> bool:
    s = candidate.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def redact(text: str) -> str:
    """Replace emails, IBANs, card numbers (Luhn-checked), national ID numbers and phone numbers."""
    text = _EMAIL.sub("[EMAIL]", text)
    text = _IBAN.sub(lambda m: "[IBAN]" if _iban_ok(m.group()) else m.group(), text)

    def card(m: re.Match[str]) -> str:
        digits = re.sub(r"\D", "", m.group())
        return "[CARD]" if 13 <= len(digits) <= 19 and luhn_ok(digits) else m.group()

    text = _CARD.sub(card, text)
    text = _US_SSN.sub("[NATIONAL_ID]", text)
    text = _UK_NINO.sub("[NATIONAL_ID]", text)
    return _PHONE.sub(lambda m: "[PHONE]" if 7 <= sum(c.isdigit() for c in m.group()) <= 15 else m.group(), text)


def log_request(record: dict[str, Any], prompt: str | None = None, output: str | None = None,
                log_prompts: bool = False) -> None:
    """Write the record as one JSON line; prompt and output only with `log_prompts`, and then redacted."""
    if log_prompts:
        record = {**record, "prompt": redact(prompt) if prompt else prompt, "output": redact(output) if output else output}
    log.info(json.dumps(record, ensure_ascii=False, default=str))
