"""The settlement rule table: what an exchange's facts mean for its credit and its Idempotency-Key.

Written once, with a test per row (tests/pipeline/test_rules.py). The rule:
the client is charged exactly when it received a complete chargeable answer,
or left after such an answer's status arrived; an Idempotency-Key is kept
exactly when the attempt was charged or the upstream's complete answer was
delivered; otherwise the credit is voided and the key released, so a retry
is judged afresh.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

__all__ = ["Facts", "Verdict", "decide", "parse_charge"]

log = logging.getLogger("gateway.pipeline")

# More digits than any charge the config allows; longer values are refused
# before int() sees them (CPython refuses to parse over 4,300 digits at all).
_MAX_CHARGE_DIGITS = 10


@dataclass(slots=True)
class Facts:
    """What happened in one exchange, as the forward stage reports it."""

    # The upstream's final status, once a valid one (200-599) arrived.
    status: int | None = None
    # A reservation is held and this status is one the route charges for.
    chargeable: bool = False
    # What a charged answer costs: the route's cost, lowered by X-Gateway-Charge.
    charge: int = 0
    # The whole answer was handed to the client.
    complete: bool = False
    # The client went away after the status arrived.
    client_left: bool = False
    # After the status, the upstream broke off or the exchange was cut (deadline,
    # error): what the client got is not an answer.
    broke: bool = False


@dataclass(frozen=True, slots=True)
class Verdict:
    charge: int | None  # None: void the reservation; else post this amount
    keep_key: bool  # keep the Idempotency-Key as used; else release it
    store_answer: bool  # keep the answer for replays (only when it was delivered whole)


_VOID_AND_RELEASE = Verdict(None, keep_key=False, store_answer=False)


def decide(facts: Facts) -> Verdict:
    """The one rule table; every branch is a row with its own test."""
    if facts.status is None:  # no answer: refused, unreachable, timed out, client gone
        return _VOID_AND_RELEASE
    charge = facts.charge if facts.chargeable else None
    if facts.complete:  # delivered whole: charged if chargeable, kept for replays
        return Verdict(charge, keep_key=True, store_answer=True)
    if facts.client_left and not facts.broke:  # the work was done for a client that left
        return Verdict(charge, keep_key=charge is not None, store_answer=False)
    return _VOID_AND_RELEASE  # broken off or cut short after the status line


def parse_charge(values: list[str], cost: int) -> int:
    """The charge of a 2xx answer: ``cost``, lowered by one ``X-Gateway-Charge`` of 0..cost.

    ASCII digits only and one occurrence; anything else charges the full cost
    and logs a warning (never an error for the client: the work was done).
    """
    if not values:
        return cost
    if len(values) == 1:
        value = values[0].strip(" \t")
        if value.isascii() and value.isdigit() and len(value) <= _MAX_CHARGE_DIGITS:
            charge = int(value)
            if charge <= cost:
                return charge
    log.warning(
        "ignoring an invalid X-Gateway-Charge from the upstream (%d value(s)); charging %d",
        len(values),
        cost,
    )
    return cost
