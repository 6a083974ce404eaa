"""The micro-batcher shared by the credit ledger and the Redis limiter."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from gateway.batching import Grouper


class Backend:
    """Records each batch it is given; answers after a turn of the loop, like a round trip."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.fail_on = fail_on

    async def run(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        await asyncio.sleep(0.01)
        if self.fail_on is not None and self.fail_on in items:
            raise OSError("backend broke")
        return [item * 10 for item in items]


async def test_a_lone_call_goes_out_alone_and_at_once() -> None:
    backend = Backend()
    grouper = Grouper(backend.run)
    assert await grouper.submit(1) == 10
    assert backend.batches == [[1]]


async def test_calls_made_while_a_batch_is_out_form_the_next_batch() -> None:
    backend = Backend()
    grouper = Grouper(backend.run)
    first = grouper.submit(0)
    await asyncio.sleep(0)  # the first batch ([0]) is now with the backend
    rest = [grouper.submit(i) for i in range(1, 8)]
    assert await first == 0
    assert await asyncio.gather(*rest) == [i * 10 for i in range(1, 8)]
    assert backend.batches == [[0], list(range(1, 8))]


async def test_batches_are_capped_and_keep_their_order() -> None:
    backend = Backend()
    grouper = Grouper(backend.run, max_batch=3)
    results = await asyncio.gather(*(grouper.submit(i) for i in range(8)))
    assert results == [i * 10 for i in range(8)]
    assert backend.batches == [[0, 1, 2], [3, 4, 5], [6, 7]]


async def test_a_failed_batch_fails_each_of_its_callers_and_no_other() -> None:
    backend = Backend(fail_on=2)
    grouper = Grouper(backend.run, max_batch=3)
    futures = [grouper.submit(i) for i in range(6)]
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert [isinstance(o, OSError) for o in outcomes] == [True] * 3 + [False] * 3
    assert outcomes[3:] == [30, 40, 50]


async def test_a_caller_that_leaves_does_not_disturb_the_batch() -> None:
    backend = Backend()
    grouper = Grouper(backend.run)
    leaving = asyncio.ensure_future(grouper.submit(1))
    staying = grouper.submit(2)
    await asyncio.sleep(0)
    leaving.cancel()
    assert await staying == 20
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert backend.batches == [[1, 2]]  # the backend still saw it: callers must allow for that


async def test_on_idle_is_called_once_the_queue_is_empty() -> None:
    backend = Backend()
    idle: list[int] = []
    grouper = Grouper(backend.run, on_idle=lambda: idle.append(len(backend.batches)))
    await asyncio.gather(*(grouper.submit(i) for i in range(3)))
    await asyncio.sleep(0)
    assert idle == [1]
    assert await grouper.submit(9) == 90
    await asyncio.sleep(0)
    assert idle == [1, 2]


async def test_idle_waits_for_every_batch_under_way() -> None:
    release = asyncio.Event()
    ran: list[list[int]] = []

    async def run(items: Sequence[int]) -> list[int]:
        await release.wait()
        ran.append(list(items))
        return [i * 10 for i in items]

    grouper: Grouper[int, int] = Grouper(run)
    first, second = grouper.submit(1), grouper.submit(2)
    waiting = asyncio.create_task(grouper.idle())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    release.set()
    await waiting
    assert first.result() == 10 and second.result() == 20
    assert ran == [[1, 2]]
    await grouper.idle()  # nothing under way: returns at once
