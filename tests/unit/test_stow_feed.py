"""The bridge between STOW-RS's event loop and the blocking store engine (gateway.dimse.store): items
reach the worker thread in order as they come, the engine starts only with the first item, a cancel
wakes a worker waiting for the next item, and failures on either side propagate without losing the
results of what was stored."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest

from gateway.dimse.store import ItemFeed, store_streamed
from gateway.pacs import StoreItem, StoreResult

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


def item(n: int) -> StoreItem:
    return StoreItem(Path(f"/x/{n}"), CT, f"1.2.3.{n}", EXPLICIT)


class Engine:
    """A blocking engine on a real thread: records each item as it takes it from the iterable."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.taken: list[str] = []
        self.calls = 0
        self.fail_after = fail_after
        self.took = threading.Condition()

    def work(self, items: Iterable[StoreItem], cancel: threading.Event) -> list[StoreResult]:
        results = []
        for it in items:
            with self.took:
                self.taken.append(it.sop_instance_uid)
                self.took.notify_all()
            if self.fail_after is not None and len(self.taken) >= self.fail_after:
                raise RuntimeError("engine failed")
            results.append(StoreResult(0x0110 if cancel.is_set() else 0, confirmed=not cancel.is_set()))
        return results

    async def __call__(self, items: Iterable[StoreItem], cancel: threading.Event) -> list[StoreResult]:
        self.calls += 1
        return await asyncio.to_thread(self.work, items, cancel)

    async def wait_taken(self, n: int) -> None:
        def wait() -> None:
            with self.took:
                assert self.took.wait_for(lambda: len(self.taken) >= n, timeout=10)
        await asyncio.to_thread(wait)


def test_feed_gives_items_in_order_and_ends_at_close():
    feed = ItemFeed()
    got: list[str] = []
    worker = threading.Thread(target=lambda: got.extend(i.sop_instance_uid for i in feed))
    worker.start()
    for n in range(5):
        feed.put(item(n))
    feed.close()
    worker.join(10)
    assert not worker.is_alive() and got == [f"1.2.3.{n}" for n in range(5)]
    assert list(feed) == [], "stays ended"


def test_cancel_wakes_a_worker_waiting_for_the_next_item():
    feed = ItemFeed()
    feed.put(item(0))
    got: list[str] = []
    worker = threading.Thread(target=lambda: got.extend(i.sop_instance_uid for i in feed))
    worker.start()
    worker.join(0.2)
    assert worker.is_alive(), "blocked waiting for the next item"
    feed.cancel.set()
    worker.join(10)
    assert not worker.is_alive() and got == ["1.2.3.0"]
    assert feed.cancel.is_set()


def test_items_reach_the_engine_while_the_source_still_produces():
    engine = Engine()

    async def main() -> list[StoreResult]:
        async def source() -> AsyncIterator[StoreItem]:
            for n in range(3):
                yield item(n)
                await engine.wait_taken(n + 1)   # the next only once the engine has this one

        return await store_streamed(source(), engine)

    results = asyncio.run(main())
    assert engine.taken == ["1.2.3.0", "1.2.3.1", "1.2.3.2"] and len(results) == 3 and engine.calls == 1


def test_no_item_no_engine():
    engine = Engine()

    async def empty() -> AsyncIterator[StoreItem]:
        return
        yield

    assert asyncio.run(store_streamed(empty(), engine)) == []
    assert asyncio.run(store_streamed([], engine)) == []
    assert engine.calls == 0


def test_a_sequence_goes_as_it_is():
    engine = Engine()
    assert len(asyncio.run(store_streamed([item(0), item(1)], engine))) == 2
    assert engine.taken == ["1.2.3.0", "1.2.3.1"]


def test_the_source_failing_propagates_after_the_items_before_it_were_stored():
    engine = Engine()

    async def source() -> AsyncIterator[StoreItem]:
        yield item(0)
        yield item(1)
        raise ConnectionResetError("gone")

    with pytest.raises(ConnectionResetError):
        asyncio.run(store_streamed(source(), engine))
    assert engine.taken == ["1.2.3.0", "1.2.3.1"]


def test_the_engine_failing_stops_reading_the_source():
    engine = Engine(fail_after=1)
    produced: list[int] = []

    async def main() -> None:
        blocked = asyncio.Event()

        async def source() -> AsyncIterator[StoreItem]:
            produced.append(0)
            yield item(0)
            await blocked.wait()    # the next item never comes: only the pump's cancel ends this
            produced.append(1)
            yield item(1)

        await asyncio.wait_for(store_streamed(source(), engine), 10)

    with pytest.raises(RuntimeError, match="engine failed"):
        asyncio.run(main())
    assert produced == [0]


def test_cancelling_the_caller_cancels_the_engine_and_wakes_its_worker():
    engine = Engine()
    finished = threading.Event()

    async def main() -> None:
        async def source() -> AsyncIterator[StoreItem]:
            yield item(0)
            await asyncio.Event().wait()   # a client that never sends the next part
            yield item(1)

        async def cancellable(items: Iterable[StoreItem], cancel: threading.Event) -> list[StoreResult]:
            # What Workers.run does: on cancellation set ``cancel`` and wait for the worker.
            future = asyncio.ensure_future(asyncio.to_thread(engine.work, items, cancel))
            try:
                return await asyncio.shield(future)
            except asyncio.CancelledError:
                cancel.set()
                await asyncio.wait_for(future, 10)
                finished.set()
                raise

        task = asyncio.create_task(store_streamed(source(), cancellable))
        await engine.wait_taken(1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert finished.is_set() and engine.taken == ["1.2.3.0"]
