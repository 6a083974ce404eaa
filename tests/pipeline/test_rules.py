"""The settlement rule table, one test per row, and the X-Gateway-Charge parser."""

from __future__ import annotations

import logging

import pytest

from gateway.pipeline.rules import Facts, Verdict, decide, parse_charge

COST = 5


def test_no_answer_voids_and_releases() -> None:
    # Refused, unreachable, timed out before the status, or the client left first.
    assert decide(Facts()) == Verdict(None, keep_key=False, store_answer=False)


def test_a_chargeable_answer_delivered_whole_is_charged_and_kept() -> None:
    facts = Facts(status=200, chargeable=True, charge=COST, complete=True)
    assert decide(facts) == Verdict(COST, keep_key=True, store_answer=True)


def test_a_lowered_charge_is_what_is_posted() -> None:
    facts = Facts(status=200, chargeable=True, charge=2, complete=True)
    assert decide(facts).charge == 2


def test_a_refunded_answer_delivered_whole_is_free_but_kept_for_replays() -> None:
    facts = Facts(status=500, chargeable=False, complete=True)
    assert decide(facts) == Verdict(None, keep_key=True, store_answer=True)


def test_a_client_that_left_after_a_chargeable_status_is_charged_and_its_key_kept() -> None:
    facts = Facts(status=200, chargeable=True, charge=COST, client_left=True)
    assert decide(facts) == Verdict(COST, keep_key=True, store_answer=False)


def test_a_client_that_left_after_a_refunded_status_pays_nothing_and_may_retry() -> None:
    facts = Facts(status=503, chargeable=False, client_left=True)
    assert decide(facts) == Verdict(None, keep_key=False, store_answer=False)


def test_an_answer_broken_off_after_its_status_is_voided_and_released() -> None:
    facts = Facts(status=200, chargeable=True, charge=COST, broke=True)
    assert decide(facts) == Verdict(None, keep_key=False, store_answer=False)


def test_an_answer_cut_short_without_a_reason_is_voided_and_released() -> None:
    # Neither whole, nor a client that left: an error or a deadline ended it.
    facts = Facts(status=200, chargeable=True, charge=COST)
    assert decide(facts) == Verdict(None, keep_key=False, store_answer=False)


def test_unmetered_answers_are_kept_only_when_delivered_whole() -> None:
    assert decide(Facts(status=200, complete=True)) == Verdict(None, True, True)
    assert decide(Facts(status=200, client_left=True)) == Verdict(None, False, False)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], COST),
        (["0"], 0),
        (["2"], 2),
        ([" 3 "], 3),
        ([str(COST)], COST),
        ([str(COST + 1)], COST),
        (["-1"], COST),
        (["+1"], COST),
        (["1.0"], COST),
        (["²"], COST),
        (["٣"], COST),
        (["9" * 5000], COST),
        (["1", "1"], COST),
        (["1", "2"], COST),
        ([""], COST),
    ],
)
def test_the_charge_header_is_ascii_digits_once_within_the_cost(
    values: list[str], expected: int
) -> None:
    assert parse_charge(values, COST) == expected


def test_an_invalid_charge_header_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.pipeline"):
        assert parse_charge(["²"], COST) == COST
    assert "X-Gateway-Charge" in caplog.text
