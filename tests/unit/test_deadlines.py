"""Deadlines: a watched task that outlives the limit gets TimeoutError, within one slot of it;
one that finishes in time, or is cancelled from outside, is left as it is."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from gpu_matrix_service.deadlines import Deadlines


def run(coroutine):
    return asyncio.run(coroutine)


def test_a_task_past_its_limit_gets_timeout_error_within_one_slot():
    async def main() -> float:
        deadlines = Deadlines(0.2, slot_seconds=0.05)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(TimeoutError), deadlines.watch():
            await asyncio.sleep(10)
        assert deadlines.watched() == 0
        return loop.time() - start

    waited = run(main())
    assert 0.2 <= waited < 0.2 + 0.05 + 0.1  # never early; late by a slot at most (+ slack)


def test_a_task_that_finishes_in_time_is_not_cancelled_later():
    async def main() -> None:
        deadlines = Deadlines(0.1, slot_seconds=0.05)
        with deadlines.watch():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # past the limit: nothing may cancel this task now
        assert deadlines.watched() == 0

    run(main())


def test_only_the_late_ones_of_many_watches_time_out():
    async def watched(deadlines: Deadlines, seconds: float) -> str:
        try:
            with deadlines.watch():
                await asyncio.sleep(seconds)
        except TimeoutError:
            return "timeout"
        return "done"

    async def main() -> list[str]:
        deadlines = Deadlines(0.15, slot_seconds=0.01)
        return await asyncio.gather(*(watched(deadlines, s) for s in (0.01, 0.5, 0.05, 1.0)))

    assert run(main()) == ["done", "timeout", "done", "timeout"]


def test_a_cancellation_from_outside_stays_a_cancellation():
    async def main() -> None:
        deadlines = Deadlines(10)

        async def watched() -> None:
            with deadlines.watch():
                await asyncio.sleep(10)

        task = asyncio.create_task(watched())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert deadlines.watched() == 0

    run(main())


def test_an_error_inside_the_watch_passes_through_unchanged():
    async def main() -> None:
        deadlines = Deadlines(10)
        with pytest.raises(KeyError), deadlines.watch():
            raise KeyError("x")

    run(main())


def test_each_event_loop_gets_its_own_timers():
    deadlines = Deadlines(0.1, slot_seconds=0.05)

    async def late() -> None:
        with pytest.raises(TimeoutError), deadlines.watch():
            await asyncio.sleep(5)

    run(late())
    run(late())  # a second loop: the first loop's (never fired) timers must not be relied on


def test_an_infinite_limit_watches_nothing_as_asyncio_timeout_does():
    async def main() -> None:
        deadlines = Deadlines(float("inf"))
        with deadlines.watch():
            await asyncio.sleep(0.01)
            assert deadlines.watched() == 0

    run(main())


def test_loops_in_two_threads_each_keep_their_own_limits():
    deadlines = Deadlines(0.2, slot_seconds=0.02)
    outcomes: dict[str, str] = {}

    def in_thread(label: str) -> None:
        async def main() -> None:
            try:
                with deadlines.watch():
                    await asyncio.sleep(2)
                outcomes[label] = "no timeout"
            except TimeoutError:
                outcomes[label] = "timeout"

        asyncio.run(main())

    threads = [threading.Thread(target=in_thread, args=(label,)) for label in "ab"]
    for thread in threads:
        thread.start()
        time.sleep(0.05)  # the second loop files its watch while the first waits
    for thread in threads:
        thread.join(5)
    assert outcomes == {"a": "timeout", "b": "timeout"}
