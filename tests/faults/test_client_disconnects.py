"""Clients that go away mid-exchange, under load: every reservation is settled by its request.

- Mid-upload (the gateway is already streaming the body to the upstream; the
  client closes or resets its connection): the upstream request is cut off and
  the reservation voided.
- Mid-download after the 2xx status line arrived: the work was done and the
  charge stands (CONTRACT §1 Credits).
- Before the status line (the upstream is still thinking): the upstream request
  is cancelled and the reservation voided.

The lease is the default (over ten minutes), so a reservation that is not
pending a few seconds later was settled by its own request, not by the
sweeper. Store: SQLite; limiter: in process.
"""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

import aiohttp
import pytest

from .fixtures import Spawner
from .harness import (
    ASSESS,
    DOWNLOAD,
    UPLOAD,
    Admin,
    FaultyUpstream,
    Traffic,
    abandon_download,
    abandon_upload,
    bearer,
    download,
    figures,
    gateway_config,
    keep_sending,
    leave_before_status,
    reconcile,
    wait_for,
)

LEAVERS = 8
LEAVES_EACH = 8


async def _settled(storage: str, team_id: str) -> bool:
    return (await figures(storage, team_id)).pending == 0


@pytest.mark.timeout(60)
async def test_client_leaving_mid_upload_under_load_voids_its_reservation(
    tmp_path: Path, fault_upstream: FaultyUpstream, session: aiohttp.ClientSession, spawn: Spawner
) -> None:
    storage = f"sqlite:///{tmp_path / 'gateway.db'}"
    gateway = spawn(gateway_config(storage, fault_upstream))
    await gateway.start()
    admin = Admin(session, gateway)
    team = await admin.team("uploads", credits=100_000)
    key, _ = await admin.key("uploads")

    traffic = Traffic()
    done = asyncio.Event()
    upload = functools.partial(
        traffic.request, session, "upload", "POST", gateway.url + UPLOAD,
        headers=bearer(key), data=b"x" * (256 * 1024),
    )  # fmt: skip
    assess = functools.partial(
        traffic.request, session, "ok", "POST", gateway.url + ASSESS,
        headers=bearer(key), data=b"{}",
    )  # fmt: skip
    background = [
        asyncio.create_task(keep_sending(done, send, pause=0.005))
        for send in [upload] * 4 + [assess] * 4
    ]

    async def leaver(reset: bool) -> None:
        for _ in range(LEAVES_EACH):
            await abandon_upload(traffic, gateway, fault_upstream, key, reset)

    try:
        await asyncio.gather(*(leaver(reset=i % 2 == 0) for i in range(LEAVERS)))
    finally:
        done.set()
        await asyncio.gather(*background)

    left = traffic.of("upload_left")
    assert len(left) == LEAVERS * LEAVES_EACH
    assert {o.error for o in left} == {"reset", "closed"}
    uploads, oks = traffic.of("upload"), traffic.of("ok")
    assert uploads and all(o.status == 200 and o.complete for o in uploads), traffic.statuses(
        "upload"
    )
    assert oks and all(o.status == 200 and o.complete for o in oks), traffic.statuses("ok")

    settled_in = await wait_for(functools.partial(_settled, storage, team), timeout=5)
    ledger = await figures(storage, team)
    served = fault_upstream.served[UPLOAD] + fault_upstream.served[ASSESS]
    print(
        f"uploads: {len(left)} abandoned mid-body ({fault_upstream.broken[UPLOAD]} cut off at "
        f"the upstream), {len(uploads)} complete, {len(oks)} other requests; ledger: "
        f"{ledger.reservations} reservations, {ledger.voided} voided, {ledger.posted} posted, "
        f"charged {ledger.charged} = upstream 2xx {served}; none pending {settled_in:.2f} s "
        "after the load"
    )
    # The gateway cut the upstream request off: the upstream never finished one of them.
    assert fault_upstream.broken[UPLOAD] == len(left)
    assert fault_upstream.served[UPLOAD] == len(uploads)
    assert ledger.reservations == len(left) + len(uploads) + len(oks)
    assert ledger.voided == len(left) and ledger.expired == 0
    assert ledger.charged == ledger.posted == len(uploads) + len(oks) == served
    assert ledger.balance == 100_000 - served
    assert (await reconcile(gateway.config_path))["pending_reservations"] == 0
    assert await gateway.stop() == 0, gateway.log()[-3000:]


@pytest.mark.timeout(60)
async def test_client_leaving_mid_download_under_load_settles_every_reservation(
    tmp_path: Path, fault_upstream: FaultyUpstream, session: aiohttp.ClientSession, spawn: Spawner
) -> None:
    storage = f"sqlite:///{tmp_path / 'gateway.db'}"
    gateway = spawn(gateway_config(storage, fault_upstream))
    await gateway.start()
    admin = Admin(session, gateway)
    team = await admin.team("downloads", credits=100_000)
    key, _ = await admin.key("downloads")

    traffic = Traffic()
    done = asyncio.Event()
    fetch = functools.partial(
        download, traffic, session, gateway, key, fault_upstream.download_bytes
    )
    background = [asyncio.create_task(keep_sending(done, fetch, pause=0.005)) for _ in range(4)]

    async def after_status() -> None:
        for _ in range(LEAVES_EACH):
            await abandon_download(traffic, session, gateway, key)

    async def before_status() -> None:
        for _ in range(LEAVES_EACH):
            await leave_before_status(traffic, session, gateway, fault_upstream, key)

    try:
        await asyncio.gather(
            *(after_status() for _ in range(LEAVERS)),
            *(before_status() for _ in range(LEAVERS // 2)),
        )
    finally:
        done.set()
        await asyncio.gather(*background)

    late, early = traffic.of("download_left"), traffic.of("download_early")
    whole = traffic.of("download")
    assert len(late) == LEAVERS * LEAVES_EACH and all(o.status == 200 for o in late), late[:3]
    assert len(early) == LEAVERS // 2 * LEAVES_EACH and all(o.status == 0 for o in early)
    assert whole and all(o.complete and o.status == 200 for o in whole), traffic.statuses(
        "download"
    )

    settled_in = await wait_for(functools.partial(_settled, storage, team), timeout=5)
    ledger = await figures(storage, team)
    print(
        f"downloads: {len(late)} abandoned after the 200 status line, {len(early)} before it, "
        f"{len(whole)} complete; upstream: {fault_upstream.served[DOWNLOAD]} status lines sent, "
        f"{fault_upstream.undelivered[DOWNLOAD]} cancelled before answering, "
        f"{fault_upstream.broken[DOWNLOAD]} cut mid-body; ledger: {ledger.posted} posted, "
        f"{ledger.voided} voided, charged {ledger.charged}; none pending {settled_in:.2f} s after"
    )

    # After a 2xx status line the charge stands; before it, the credit comes back.
    async def all_cancelled() -> bool:  # the upstream notices when its 1 s wait ends
        return fault_upstream.undelivered[DOWNLOAD] >= len(early)

    await wait_for(all_cancelled, timeout=5)
    assert fault_upstream.served[DOWNLOAD] == len(late) + len(whole)
    assert fault_upstream.undelivered[DOWNLOAD] == len(early)
    assert ledger.reservations == len(late) + len(whole) + len(early)
    assert ledger.posted == ledger.charged == fault_upstream.served[DOWNLOAD]
    assert ledger.voided == len(early) and ledger.expired == 0
    assert ledger.balance == 100_000 - ledger.charged
    assert (await reconcile(gateway.config_path))["pending_reservations"] == 0
    assert await gateway.stop() == 0, gateway.log()[-3000:]
