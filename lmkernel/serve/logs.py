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
# Mainland China, as written in Chinese text: digits run straight into the characters around them (no
# spaces, so no \b), and may be full-width. Matched on a copy with full-width digits and Ｘ made ASCII.
_DIGITS_AROUND = r"(?<![0-9A-Za-z])", r"(?![0-9A-Za-z])"
_CN_ID = re.compile(_DIGITS_AROUND[0] + r"\d{17}[\dXx]" + _DIGITS_AROUND[1])
_CN_MOBILE = re.compile(_DIGITS_AROUND[0] + r"(?:(?:\+|00)?86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}" + _DIGITS_AROUND[1])
_CN_CARD = re.compile(_DIGITS_AROUND[0] + r"\d(?:[ -]?\d){15,18}" + _DIGITS_AROUND[1])
_HALF_WIDTH = str.maketrans({chr(0xFF10 + i): str(i) for i in range(10)} | {"Ｘ": "X", "ｘ": "x", "＋": "+"})
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
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


def cn_id_ok(number: str) -> bool:
    """A mainland China resident ID number: 17 digits, a plausible birth date, and the ISO 7064 MOD 11-2
    check character."""
    if len(number) != 18 or not number[:17].isdigit():
        return False
    year, month, day = int(number[6:10]), int(number[10:12]), int(number[12:14])
    if not (1900 <= year <= 2099 and 1 <= month <= 12 and 1 <= day <= 31):
        return False
    check = "10X98765432"[sum(int(d) * w for d, w in zip(number, _ID_WEIGHTS)) % 11]
    return number[17].upper() == check


def _redact_cn(text: str) -> str:
    """Resident ID numbers, mobile numbers and bank card numbers (Luhn-checked) written the Chinese way."""
    plain = text.translate(_HALF_WIDTH)  # the same length: spans found here are spans of `text`
    spans: list[tuple[int, int, str]] = []

    def take(pattern: re.Pattern[str], tag: str, ok: Any) -> None:
        for m in pattern.finditer(plain):
            if ok(m.group()) and not any(a < m.end() and m.start() < b for a, b, _ in spans):
                spans.append((m.start(), m.end(), tag))

    take(_CN_ID, "[NATIONAL_ID]", cn_id_ok)
    take(_CN_MOBILE, "[PHONE]", lambda s: True)
    take(_CN_CARD, "[CARD]", lambda s: luhn_ok(re.sub(r"\D", "", s)))
    for start, end, tag in sorted(spans, reverse=True):
        text = text[:start] + tag + text[end:]
    return text


def redact(text: str) -> str:
    """Replace emails, IBANs, card numbers (Luhn-checked), national ID numbers (US, UK, mainland China) and
    phone numbers, in Western and in Chinese writing."""
    text = _EMAIL.sub("[EMAIL]", text)
    text = _redact_cn(text)
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
