"""Upstream faults under concurrent load: every failed exchange gives its credit back.

One fault per test, sent by many clients at once while another team's clients
keep getting 200s through the same gateway: slower than the upstream timeout
(504), connection reset before an answer (502), an upstream 500 (passed
through), and a 200 status line followed by a half-close mid-body (the client
connection is aborted, never finished as a clean answer). The victim team's
balance must come out unchanged, every one of its reservations voided (with the
default, long lease: by the request itself, not the sweeper), the bystander
charged exactly for the 200s the upstream served, and ``gateway credits
reconcile`` clean. Store: SQLite; limiter: in process.
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from .fixtures import Spawner
from .harness import (
    ASSESS,
    FAULT,
    HALF_CLOSE,
    Admin,
    FaultyUpstream,
    HalfClosingUpstream,
    Outcome,
    Traffic,
    bearer,
    figures,
    gateway_config,
    keep_sending,
    reconcile,
    wait_for,
)

VICTIM_CREDITS = 1_000
FAULT_CLIENTS = 16
BYSTANDERS = 6
UPSTREAM_TIMEOUT = 1.0


@dataclass(frozen=True)
class Fault:
    path: str
    status: int  # what the client must get
    error: str | None  # the gateway's own error body, if it answers itself
    # Half-closes: the answer the upstream declared, how much of it it sent, chunked.
    half_close: tuple[int, int, bool] | None = None
    per_client: int = 12  # requests each faulty client sends, one after the other


MIB = 1024 * 1024
FAULTS = {
    "slower_than_timeout": Fault(FAULT + "/timeout", 504, "Upstream timed out", per_client=3),
    "connection_reset": Fault(FAULT + "/reset", 502, "Upstream unavailable"),
    "upstream_500": Fault(FAULT + "/error", 500, None),
    # 1 MiB declared, 128 KiB sent: too big to hold back, so the gateway's 200 status
    # line is out before the upstream breaks off and the client connection is cut.
    "half_close_mid_body": Fault(HALF_CLOSE, 200, None, (MIB, 128 * 1024, False)),
    "half_close_mid_chunked_body": Fault(HALF_CLOSE, 200, None, (0, 128 * 1024, True)),
    # A small answer the gateway may read whole before answering: then nothing went
    # out yet and a 502 is as right as a cut connection; never a clean 200.
    "half_close_mid_small_body": Fault(HALF_CLOSE, 200, None, (16 * 1024, 4096, False)),
}


def _check_fault(name: str, fault: Fault, outcome: Outcome) -> None:
    if fault.half_close is not None:
        if name == "half_close_mid_small_body" and outcome.status == 502:
            assert outcome.error is None and "error" in outcome.json(), outcome
            return
        # The status line went out before the upstream broke off: the client must
        # see the connection cut, never a clean (short) answer.
        assert outcome.status == 200, outcome
        assert outcome.error is not None, f"a broken answer was finished cleanly: {outcome}"
        return
    assert outcome.error is None, outcome
    assert outcome.status == fault.status, outcome
    body = outcome.json()
    if fault.error is not None:
        assert body == {"error": fault.error}, body
    else:  # passed through as the upstream sent it
        assert body == {"error": "upstream exploded", "from": "upstream"}, body


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", list(FAULTS))
async def test_upstream_fault_under_load_voids_every_credit(
    tmp_path: Path,
    fault_upstream: FaultyUpstream,
    session: aiohttp.ClientSession,
    spawn: Spawner,
    name: str,
) -> None:
    fault = FAULTS[name]
    declared, sent, chunked = fault.half_close or (0, 0, False)
    half_close = HalfClosingUpstream(declared=declared, sent=sent, chunked=chunked)
    await half_close.start()
    fault_upstream.slow_seconds = 2.5 * UPSTREAM_TIMEOUT
    storage = f"sqlite:///{tmp_path / 'gateway.db'}"
    try:
        gateway = spawn(
            gateway_config(storage, fault_upstream, half_close=half_close, timeout=UPSTREAM_TIMEOUT)
        )
        await gateway.start()
        admin = Admin(session, gateway)
        victim_team = await admin.team("victim", credits=VICTIM_CREDITS)
        victim, _ = await admin.key("victim")
        bystander_team = await admin.team("bystander", credits=100_000)
        bystander, _ = await admin.key("bystander")

        traffic = Traffic()
        done = asyncio.Event()
        faulty = functools.partial(
            traffic.request, session, "fault", "POST", gateway.url + fault.path,
            headers=bearer(victim), data=b"{}",
        )  # fmt: skip
        steady = functools.partial(
            traffic.request, session, "ok", "POST", gateway.url + ASSESS,
            headers=bearer(bystander), data=b"{}",
        )  # fmt: skip
        started = time.monotonic()
        bystanders = [
            asyncio.create_task(keep_sending(done, steady, pause=0.01)) for _ in range(BYSTANDERS)
        ]
        try:
            await asyncio.gather(
                *(keep_sending(done, faulty, count=fault.per_client) for _ in range(FAULT_CLIENTS))
            )
        finally:
            done.set()
            await asyncio.gather(*bystanders)
        elapsed = time.monotonic() - started

        faults = traffic.of("fault")
        assert len(faults) == FAULT_CLIENTS * fault.per_client
        for outcome in faults:
            _check_fault(name, fault, outcome)
        oks = traffic.of("ok")
        assert oks and all(o.status == 200 and o.error is None for o in oks), traffic.statuses("ok")

        # Settled by the requests themselves: the lease is the default (over 10 minutes).
        await wait_for(functools.partial(_settled, storage, victim_team), timeout=5)
        await wait_for(functools.partial(_settled, storage, bystander_team), timeout=5)
        hurt = await figures(storage, victim_team)
        calm = await figures(storage, bystander_team)

        assert hurt.balance == VICTIM_CREDITS
        assert hurt.reservations == len(faults)
        assert hurt.voided == len(faults) and hurt.charged == 0 and hurt.expired == 0
        assert calm.charged == calm.posted == len(oks) == fault_upstream.served[ASSESS]
        assert calm.balance == 100_000 - len(oks)
        # Every faulty request reached the faulty upstream, once (never retried).
        if fault.half_close is not None:
            assert half_close.received == half_close.status_lines == len(faults)
        else:
            assert fault_upstream.received[fault.path] == len(faults)
        result = await reconcile(gateway.config_path)
        assert result["pending_reservations"] == 0
        print(
            f"{name}: {len(faults)} faulty requests from {FAULT_CLIENTS} clients, all "
            f"{traffic.statuses('fault')}, {len(faults)} reservations voided, victim balance "
            f"{hurt.balance}/{VICTIM_CREDITS}; alongside {len(oks)} ok requests charged "
            f"{calm.charged} (upstream served {fault_upstream.served[ASSESS]}); {elapsed:.1f} s"
        )
        assert await gateway.stop() == 0, gateway.log()[-3000:]
    finally:
        await half_close.close()


async def _settled(storage: str, team_id: str) -> bool:
    return (await figures(storage, team_id)).pending == 0
