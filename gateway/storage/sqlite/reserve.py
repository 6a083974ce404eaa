"""SQLite: one reserve request judged inside the batch's transaction.

The balance (read once per account and batch by the caller), a capped key's
caps and spend (:class:`Spend`, read once per key and batch, written once),
the Idempotency-Key claim and the reservation row: the same judgement, in the
same order, as PostgreSQL's ``gateway_reserve`` and ``gateway_reserve_capped``.
"""

from __future__ import annotations

import sqlite3

from gateway.storage import IDEMPOTENCY_TTL_SECONDS, CapPeriods, ReserveRequest, ReserveResult
from gateway.storage import rows as model
from gateway.storage.sqlite.idempotency import CLAIM_SQL, HELD_SQL

__all__ = ["Spend", "reserve_one"]


def _smaller(have: int, left: int | None) -> int:
    return have if left is None else min(have, left)


def _reserved(db: sqlite3.Connection, reservation_id: str) -> bool:
    found = db.execute("SELECT 1 FROM reservations WHERE id = ?", (reservation_id,)).fetchone()
    return found is not None


class Spend:
    """Capped keys during one reserve batch: each key's caps and spend read once, written once.

    The caps are read from the key as it stands, inside the reserve transaction:
    the ledger, not a gateway's key cache, owns the rule.
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        # Per key and periods: (period key, cap) of each cap the key has.
        self._caps: dict[tuple[str, CapPeriods], tuple[tuple[str, int], ...]] = {}
        self._spent: dict[tuple[str, str], int] = {}
        self._added: dict[tuple[str, str], int] = {}

    def caps(self, req: ReserveRequest) -> tuple[tuple[str, int], ...]:
        """(period key, cap) of each cap the request's key has now (none: not capped)."""
        periods = req.caps
        if periods is None:
            return ()
        found = self._caps.get((req.key_id, periods))
        if found is None:
            found = self._read(req.key_id, periods)
        return found

    def _read(self, key_id: str, periods: CapPeriods) -> tuple[tuple[str, int], ...]:
        """The key's caps and what it has spent in both periods: one statement."""
        row = self._db.execute(
            "SELECT k.credit_cap_per_day, k.credit_cap_per_month, d.spent, m.spent "
            "FROM api_keys k "
            "LEFT JOIN key_spend d ON d.key_id = k.id AND d.period_key = ? "
            "LEFT JOIN key_spend m ON m.key_id = k.id AND m.period_key = ? "
            "WHERE k.id = ?",
            (periods.day, periods.month, key_id),
        ).fetchone()
        counted = []
        if row is not None:
            for cap, spent, period in (
                (row[0], row[2], periods.day),
                (row[1], row[3], periods.month),
            ):
                if cap is not None:
                    counted.append((period, int(cap)))
                    # Already counted in this batch: keep the batch's figure.
                    self._spent.setdefault((key_id, period), int(spent or 0))
        found = self._caps[(key_id, periods)] = tuple(counted)
        return found

    def left(self, req: ReserveRequest) -> int | None:
        """What the key's caps still allow this period: the least of them (never below 0)."""
        left: int | None = None
        for period, cap in self.caps(req):
            room = max(0, cap - self._spent[(req.key_id, period)])
            left = room if left is None else min(left, room)
        return left

    def add(self, req: ReserveRequest) -> None:
        for period, _ in self.caps(req):
            at = (req.key_id, period)
            self._spent[at] += req.amount
            self._added[at] = self._added.get(at, 0) + req.amount

    def write(self) -> None:
        if self._added:
            self._db.executemany(
                "INSERT INTO key_spend (key_id, period_key, spent) VALUES (?, ?, ?) "
                "ON CONFLICT (key_id, period_key) DO UPDATE SET spent = spent + excluded.spent",
                [(key_id, period, added) for (key_id, period), added in self._added.items()],
            )


def _insert_reservation(
    db: sqlite3.Connection, req: ReserveRequest, now: float, deadline: float, spend: Spend
) -> bool:
    """The reservation row, unless its id was reserved already (a retry): whether written."""
    counted = [period for period, _ in spend.caps(req)]
    periods = req.caps
    inserted = db.execute(
        "INSERT OR IGNORE INTO reservations (id, team_id, environment, key_id, amount, "
        "created_at, lease_deadline, cap_day, cap_month) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            req.reservation_id,
            req.team_id,
            req.environment,
            req.key_id,
            req.amount,
            now,
            deadline,
            periods.day if periods is not None and periods.day in counted else None,
            periods.month if periods is not None and periods.month in counted else None,
        ),
    ).rowcount
    return bool(inserted)


def reserve_one(
    db: sqlite3.Connection,
    req: ReserveRequest,
    have: int,
    now: float,
    deadline: float,
    spend: Spend,
) -> tuple[ReserveResult, int]:
    """One request of a batch against its account's balance ``have``; returns the new one."""
    claim = req.idempotency
    held: sqlite3.Row | None = None
    if claim is not None:
        # Records written earlier in this batch are seen too (same transaction).
        held = db.execute(
            HELD_SQL, (req.team_id, req.environment, claim.key, now - IDEMPOTENCY_TTL_SECONDS)
        ).fetchone()
        # A retry of the reservation that made the record is a retried id, no replay.
        if held is not None and held["reservation_id"] != req.reservation_id:
            return ReserveResult(False, have, model.idempotency_record(held)), have
    left = spend.left(req)
    if have < req.amount:
        return ReserveResult(False, _smaller(have, left)), have
    if left is not None and left < req.amount:
        # Over the cap, unless this is a retry of an id reserved (and counted) already.
        if not _reserved(db, req.reservation_id):
            return ReserveResult(False, _smaller(have, left)), have
    elif _insert_reservation(db, req, now, deadline, spend):  # else a retried id: never take twice
        have -= req.amount
        if left is not None:
            spend.add(req)
            left -= req.amount
    if claim is not None and held is None:
        db.execute(
            CLAIM_SQL,
            (
                req.team_id,
                req.environment,
                claim.key,
                claim.method,
                claim.path,
                req.reservation_id,
                now,
            ),
        )
    return ReserveResult(True, _smaller(have, left)), have
