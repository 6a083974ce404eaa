"""Events and webhook deliveries on both backends: the outbox is written with its change
(and never without it), balance alerts fire once per crossing, each event reaches each
endpoint once however many workers claim, and failures lead to retries, then to a
disabled endpoint that says so."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import orjson
import pytest

from gateway.storage import AuditRecord, Backend, EventRecord, NotFound, ReserveRequest
from gateway.storage.events import AttemptResult, Endpoint
from tests.storage.conftest import Backends
from tests.storage.test_admin_store import AUDIT_REFUSED, refuse_audit_entries


def tells(event: EventRecord, action: str = "test.change") -> AuditRecord:
    return AuditRecord("admin", action, None, event.team_id, None, {}, (event,))


async def endpoint(db: Backend, team: str, events: list[str] | None = None) -> Endpoint:
    return await db.create_webhook(
        team, "http://127.0.0.1:9/hook", "", events or ["*"], "whsec_" + "A" * 32
    )


async def due_types(db: Backend) -> list[str]:
    """Fan out what is new, then claim everything due: the event types, oldest first."""
    await db.dispatch_events(500)
    return [d.event_type for d in await db.claim_deliveries(60.0, 100)]


async def reserve(db: Backend, team: str, rid: str, amount: int) -> None:
    [result] = await db.reserve_batch([ReserveRequest(rid, team, "live", "key_1", amount)])
    assert result.granted


async def test_a_change_writes_its_event_with_its_audit_entry(db: Backend) -> None:
    team = (await db.create_team("t")).id
    hook = await endpoint(db, team)
    key = await db.create_key(
        team, "k", "live", "h" * 64, "ckiq_live_ab", None, None,
        audit=lambda made: tells(EventRecord("key.created", team, {"key_id": made.id})),
    )  # fmt: skip
    await db.dispatch_events(500)
    [due] = await db.claim_deliveries(60.0, 10)
    assert (due.event_type, due.endpoint_id, due.url) == ("key.created", hook.id, hook.url)
    assert orjson.loads(due.data) == {"key_id": key.id}
    assert due.attempts == 1 and due.secrets == ("whsec_" + "A" * 32,)
    # Claimed: no one else gets it while its lease runs.
    assert await db.claim_deliveries(60.0, 10) == []


async def test_a_rolled_back_change_leaves_no_event(db: Backend, backends: Backends) -> None:
    """credits.low is written by the balance's trigger; the grant's audit entry is then
    refused, so the whole grant rolls back, and its event with it."""
    team = (await db.create_team("t")).id
    await endpoint(db, team)
    await db.grant(team, "live", 100, "start", "test")
    await db.set_alert(team, "live", 50)
    await refuse_audit_entries(backends, "boom")
    with pytest.raises(AUDIT_REFUSED):
        await db.apply_grant(
            team, "live", -60, "take back", "admin", None, None,
            audit=lambda _: AuditRecord("admin", "boom", None, team, None, {}),
        )  # fmt: skip
    assert await db.balance(team, "live") == 100
    assert await due_types(db) == []
    # The same adjustment, audited, crosses the line and tells it once.
    await db.apply_grant(
        team, "live", -60, "take back", "admin", None, None,
        audit=lambda _: AuditRecord("admin", "credits.adjust", None, team, None, {}),
    )  # fmt: skip
    assert await due_types(db) == ["credits.low"]


async def test_an_event_that_cannot_be_written_stops_its_change(
    db: Backend, backends: Backends
) -> None:
    team = (await db.create_team("t")).id
    # PostgreSQL's backend reads the broken foreign key as "no such team".
    with pytest.raises((*AUDIT_REFUSED, sqlite3.IntegrityError, NotFound)):
        await db.create_key(
            team, "k", "live", "h" * 64, "ckiq_live_ab", None, None,
            # An event for a team that does not exist breaks the foreign key.
            audit=lambda _: tells(EventRecord("key.created", "team_missing", {})),
        )  # fmt: skip
    assert await db.list_keys(team, 10, None) == []


async def test_credits_low_and_exhausted_fire_once_per_crossing(db: Backend) -> None:
    team = (await db.create_team("t")).id
    await endpoint(db, team)
    await db.set_alert(team, "live", 10)
    await db.grant(team, "live", 20, "start", "test")
    await reserve(db, team, "r1", 5)  # 15
    assert await due_types(db) == []
    await reserve(db, team, "r2", 6)  # 9: below the line
    assert await due_types(db) == ["credits.low"]
    # Hovering: refunded above the line and spent below it again, several times.
    for n in range(3):
        await db.void_batch(["r2"] if n == 0 else [f"h{n - 1}"])
        await reserve(db, team, f"h{n}", 6)
    assert await due_types(db) == []
    # A grant arms it again; the next crossing tells again, and zero tells once.
    await db.grant(team, "live", 20, "top-up", "test")  # 29
    await reserve(db, team, "r3", 20)  # 9
    await reserve(db, team, "r4", 9)  # 0
    await db.void_batch(["r4"])
    await reserve(db, team, "r5", 9)  # 0 again: no second exhausted
    assert await due_types(db) == ["credits.low", "credits.exhausted"]
    assert await db.reconcile() == []


async def test_each_event_reaches_each_endpoint_once_whatever_the_claimers(
    backends: Backends,
) -> None:
    first, second = await backends.open(), await backends.open()
    team = (await first.create_team("t")).id
    hooks = [await endpoint(first, team), await endpoint(first, team, ["key.revoked"])]
    events = [EventRecord("key.revoked" if n % 2 else "key.created", team, {"n": n})
              for n in range(40)]  # fmt: skip
    await first.add_events(events)
    await asyncio.gather(first.dispatch_events(7), second.dispatch_events(7))
    while await first.dispatch_events(7):
        pass
    claims = await asyncio.gather(
        *(db.claim_deliveries(60.0, 5) for db in (first, second) for _ in range(12))
    )
    taken = [(d.event_id, d.endpoint_id) for batch in claims for d in batch]
    assert len(taken) == len(set(taken)) == 40 + 20
    assert {e for _, e in taken} == {h.id for h in hooks}


async def test_failures_retry_then_disable_the_endpoint_which_tells_the_others(
    db: Backend,
) -> None:
    team = (await db.create_team("t")).id
    failing = await endpoint(db, team)
    other = await endpoint(db, team, ["webhook.disabled"])
    await db.add_events([EventRecord("key.created", team, {})])
    await db.dispatch_events(10)
    [due] = await db.claim_deliveries(60.0, 10)
    now = time.time()
    await db.record_attempt(AttemptResult(due.id, now, 500, 3.0, "the receiver answered 500",
                                          "pending", now - 1, None))  # fmt: skip
    [again] = await db.claim_deliveries(60.0, 10)
    assert (again.id, again.attempts) == (due.id, 2)
    assert again.failing_since == pytest.approx(now, abs=1e-5)
    await db.record_attempt(AttemptResult(due.id, now, None, 5.0, "refused", "pending",
                                          now - 1, "no successful delivery since then"))  # fmt: skip
    shown = await db.get_webhook(failing.id)
    assert not shown.enabled and shown.disabled_reason == "no successful delivery since then"
    # A disabled endpoint's deliveries wait; the other endpoint hears of it.
    assert await due_types(db) == ["webhook.disabled"]
    attempts = await db.delivery_attempts(failing.id, 10)
    assert [(a.status, a.error) for a in attempts] == [
        (None, "refused"), (500, "the receiver answered 500")
    ]
    # Enabled again: failures forgotten, the delivery due again.
    enabled = await db.update_webhook(failing.id, {"enabled": True})
    assert enabled.enabled and enabled.failing_since is None and enabled.disabled_reason is None
    assert [d.id for d in await db.claim_deliveries(60.0, 10)] == [due.id]
    assert other.id != failing.id


async def test_a_retried_delivery_is_due_now_and_a_test_event_goes_to_one_endpoint(
    db: Backend,
) -> None:
    team = (await db.create_team("t")).id
    hook, other = await endpoint(db, team), await endpoint(db, team)
    event_id = await db.add_test_event(hook.id, EventRecord("webhook.test", team, {}))
    await db.dispatch_events(10)
    [due] = await db.claim_deliveries(60.0, 10)
    assert (due.event_id, due.endpoint_id) == (event_id, hook.id)
    now = time.time()
    await db.record_attempt(AttemptResult(due.id, now, 200, 1.0, None, "delivered", None, None))
    assert await db.claim_deliveries(60.0, 10) == []
    await db.retry_delivery(hook.id, due.id)
    [again] = await db.claim_deliveries(60.0, 10)
    assert again.id == due.id
    with pytest.raises(NotFound):
        await db.retry_delivery(other.id, due.id)


async def test_a_key_expiry_is_told_once(db: Backend) -> None:
    team = (await db.create_team("t")).id
    await endpoint(db, team)
    now = time.time()
    await db.create_key(team, "k", "live", "h" * 64, "ckiq_live_ab", None, now - 10)
    await db.create_key(team, "later", "live", "g" * 64, "ckiq_live_cd", None, now + 3600)
    assert await db.add_expired_key_events(now - 60, now) == 1
    assert await db.add_expired_key_events(now - 60, now) == 0  # another worker, same expiry
    assert await due_types(db) == ["key.expired"]


async def test_deleting_an_endpoint_removes_its_deliveries_and_old_events_are_pruned(
    db: Backend,
) -> None:
    team = (await db.create_team("t")).id
    hook = await endpoint(db, team)
    await db.add_events([EventRecord("key.created", team, {})])
    await db.dispatch_events(10)
    assert (await db.webhook_queue()).pending == 1
    await db.delete_webhook(hook.id)
    assert (await db.webhook_queue()).pending == 0
    assert await db.webhooks(team) == []
    assert await db.prune_events(time.time() + 1, 100) == 1
