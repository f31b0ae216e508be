"""Redaction of personal data from logged prompts, and the one JSON line per request."""

from __future__ import annotations

import json
import logging

from lmkernel.serve.logs import cn_id_ok, log_request, luhn_ok, redact


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


def _luhn_complete(prefix: str) -> str:
    return next(prefix + d for d in "0123456789" if luhn_ok(prefix + d))


def test_mainland_china_id_numbers_mobiles_and_cards_in_chinese_text() -> None:
    card = _luhn_complete("622202020011223344")  # a 19-digit UnionPay-style number
    cases = {
        "我的身份证号是11010519491231002X，请查收": "我的身份证号是[NATIONAL_ID]，请查收",
        "身份证：１１０１０５１９４９１２３１００２Ｘ。": "身份证：[NATIONAL_ID]。",  # full-width digits
        "手机13800138000联系我": "手机[PHONE]联系我",
        "电话＋８６ １３８ ００１３ ８０００": "电话[PHONE]",
        f"请转账到卡号{card}谢谢": "请转账到卡号[CARD]谢谢",
    }
    for text, expected in cases.items():
        assert redact(text) == expected
    assert cn_id_ok("11010519491231002X") and not cn_id_ok("110105194912310021")


def test_chinese_numbers_that_are_not_personal_stay() -> None:
    card = _luhn_complete("622202020011223344")
    not_a_card = card[:-1] + str((int(card[-1]) + 1) % 10)  # fails the Luhn check
    for text in ("订单号110105194912310021已发货",  # an ID's shape with the wrong check character
                 "编号12012345678号",  # 11 digits, but no mobile prefix (1[3-9])
                 f"流水号{not_a_card}",
                 "营业收入同比增长12%，达到1234567890元"):
        assert redact(text) == text
