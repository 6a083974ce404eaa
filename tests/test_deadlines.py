"""Exchange deadlines: cut when due (within the sweep's resolution), never early."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.deadlines import Deadline, Deadlines

RESOLUTION = 0.02


async def test_a_deadline_past_its_end_raises_timeout_error() -> None:
    deadlines = Deadlines(RESOLUTION)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        async with deadlines.until(_monotonic_in(0.1)):
            await asyncio.sleep(5)
    took = loop.time() - started
    assert 0.1 <= took < 0.1 + 10 * RESOLUTION, took
    assert len(deadlines) == 0
    await deadlines.close()


async def test_work_done_in_time_is_not_cut() -> None:
    deadlines = Deadlines(RESOLUTION)
    async with deadlines.until(_monotonic_in(0.3)):
        assert len(deadlines) == 1
        await asyncio.sleep(0.1)
    assert len(deadlines) == 0
    # Sweeps run past the deadline; the task goes on uncancelled.
    await asyncio.sleep(0.3)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    await deadlines.close()


async def test_progress_restarts_the_quiet_time_and_silence_is_cut() -> None:
    deadlines = Deadlines(RESOLUTION)
    loop = asyncio.get_running_loop()
    moved = 0
    with pytest.raises(TimeoutError):
        async with deadlines.until(_monotonic_in(60)) as deadline:
            deadline.answered(_monotonic_in(60), quiet=0.15)
            for _ in range(10):  # 0.5 s in all, more than three quiet limits
                await asyncio.sleep(0.05)
                deadline.progress()
                moved += 1
            silent_from = loop.time()
            await asyncio.sleep(5)
    assert moved == 10
    silent = loop.time() - silent_from
    assert 0.15 <= silent < 0.15 + 10 * RESOLUTION, silent
    await deadlines.close()


async def test_waiting_on_the_client_pauses_the_quiet_time_but_not_the_end() -> None:
    deadlines = Deadlines(RESOLUTION)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        async with deadlines.until(_monotonic_in(60)) as deadline:
            deadline.answered(_monotonic_in(0.6), quiet=0.1)
            deadline.client_turn()
            await asyncio.sleep(0.3)  # three quiet limits, all on the client's side
            paused_for = loop.time() - started
            deadline.progress()  # the upstream's turn again: its silence counts
            await asyncio.sleep(5)
    cut_after = loop.time() - started
    assert paused_for >= 0.3
    assert paused_for + 0.1 <= cut_after < paused_for + 0.1 + 10 * RESOLUTION, cut_after

    # The whole exchange's end holds while the client is slow.
    started = loop.time()
    with pytest.raises(TimeoutError):
        async with deadlines.until(_monotonic_in(60)) as deadline:
            deadline.answered(_monotonic_in(0.2), quiet=0.05)
            deadline.client_turn()
            await asyncio.sleep(5)
    assert 0.2 <= loop.time() - started < 0.2 + 10 * RESOLUTION
    await deadlines.close()


async def test_the_whole_exchange_limit_holds_despite_progress() -> None:
    deadlines = Deadlines(RESOLUTION)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        async with deadlines.until(_monotonic_in(60)) as deadline:
            deadline.answered(_monotonic_in(0.2), quiet=10)
            while True:
                await asyncio.sleep(0.01)
                deadline.progress()
    assert 0.2 <= loop.time() - started < 0.2 + 10 * RESOLUTION
    await deadlines.close()


async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    deadlines = Deadlines(RESOLUTION)
    entered = asyncio.Event()

    async def exchange() -> None:
        async with deadlines.until(_monotonic_in(60)):
            entered.set()
            await asyncio.sleep(5)

    task = asyncio.create_task(exchange())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(deadlines) == 0
    await deadlines.close()


async def test_an_outside_cancellation_racing_the_deadline_stays_a_cancellation() -> None:
    deadlines = Deadlines(RESOLUTION)
    inside: list[Deadline] = []

    async def exchange() -> None:
        async with deadlines.until(_monotonic_in(60)) as deadline:
            inside.append(deadline)
            await asyncio.sleep(5)

    task = asyncio.create_task(exchange())
    while not inside:
        await asyncio.sleep(0)
    # Both in the same step, before the task runs again: the sweep cuts it and
    # someone else cancels it. The other cancellation must not be swallowed.
    inside[0].expire()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await deadlines.close()


async def test_a_deadline_alone_becomes_timeout_error_even_when_cut_by_hand() -> None:
    deadlines = Deadlines(RESOLUTION)
    with pytest.raises(TimeoutError):
        async with deadlines.until(_monotonic_in(60)) as deadline:
            deadline.expire()
            deadline.expire()  # twice is once
            await asyncio.sleep(5)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    await deadlines.close()


async def test_many_exchanges_each_cut_at_its_own_time() -> None:
    deadlines = Deadlines(RESOLUTION)
    loop = asyncio.get_running_loop()
    started = loop.time()
    ends = [0.05 * (i % 5 + 1) for i in range(50)]

    async def exchange(after: float) -> float:
        try:
            async with deadlines.until(_monotonic_in(after)):
                await asyncio.sleep(5)
        except TimeoutError:
            return loop.time() - started
        raise AssertionError("not cut")

    cut = await asyncio.gather(*(exchange(after) for after in ends))
    for after, at in zip(ends, cut, strict=True):
        assert after <= at < after + 10 * RESOLUTION, (after, at)
    await deadlines.close()


async def test_the_sweep_stops_when_idle_and_starts_again() -> None:
    deadlines = Deadlines(RESOLUTION)
    async with deadlines.until(_monotonic_in(1)):
        pass
    assert deadlines._sweeper is not None
    await asyncio.sleep(1.3)  # past the linger time with nothing tracked
    assert deadlines._sweeper is None
    with pytest.raises(TimeoutError):
        async with deadlines.until(_monotonic_in(0.05)):
            await asyncio.sleep(5)
    await deadlines.close()
    assert deadlines._sweeper is None


def test_resolution_must_be_positive() -> None:
    with pytest.raises(ValueError, match="resolution"):
        Deadlines(0)


def _monotonic_in(seconds: float) -> float:
    return time.monotonic() + seconds
