"""gateway.dimse.threads: the bridge's budget and cancellation contract (no network)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from gateway.dimse.threads import MIN_THREADS, Budgets, Workers, threads_for
from gateway.settings import PacsNode


def node(name: str = "n", **extra: int) -> PacsNode:
    return PacsNode(name=name, ae_title="AE", host="127.0.0.1", port=104, **extra)


@pytest.fixture()
def workers():
    w = Workers(4)
    yield w
    w.shutdown()


def test_budgets_are_per_node_and_per_kind():
    async def main() -> None:
        budgets = Budgets()
        a, b = node("a", max_query_associations=3, max_associations=2), node("b")
        assert budgets.query(a) is budgets.query(a) and budgets.query(a) is not budgets.transfer(a)
        assert budgets.query(a) is not budgets.query(b)
        assert budgets.query(a)._value == 3 and budgets.transfer(a)._value == 2

    asyncio.run(main())


def test_enough_threads_for_every_budget():
    assert threads_for([]) == MIN_THREADS
    many = [node(str(i), max_query_associations=10, max_associations=10) for i in range(5)]
    assert threads_for(many) == 100


def test_run_returns_and_holds_the_budget_meanwhile(workers):
    async def main() -> None:
        budget = asyncio.Semaphore(1)
        seen: list[bool] = []

        def work() -> int:
            seen.append(budget.locked())
            return 42

        assert await workers.run(work, budget=budget, cancel=threading.Event(), grace=1) == 42
        assert seen == [True] and not budget.locked()

    asyncio.run(main())


def test_errors_of_the_work_propagate_and_free_the_budget(workers):
    async def main() -> None:
        budget = asyncio.Semaphore(1)

        def work() -> None:
            raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            await workers.run(work, budget=budget, cancel=threading.Event(), grace=1)
        assert not budget.locked()

    asyncio.run(main())


def test_cancel_tells_the_worker_and_keeps_the_budget_until_it_stopped(workers):
    async def main() -> None:
        budget = asyncio.Semaphore(1)
        cancel = threading.Event()
        started = threading.Event()
        stopped: list[float] = []

        def work() -> None:
            started.set()
            cancel.wait(5)
            time.sleep(0.2)           # e.g. waiting for the PACS to confirm the C-CANCEL
            stopped.append(time.monotonic())

        task = asyncio.create_task(workers.run(work, budget=budget, cancel=cancel, grace=5))
        while not started.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.sleep(0.05)
        assert cancel.is_set() and budget.locked(), "budget kept while the worker stops"
        with pytest.raises(asyncio.CancelledError):
            await task
        assert stopped and not budget.locked()

    asyncio.run(main())


def test_a_worker_ignoring_cancel_gets_the_grace_period_only(workers):
    async def main() -> None:
        budget = asyncio.Semaphore(1)
        release = threading.Event()
        started = threading.Event()

        def work() -> None:
            started.set()
            release.wait(5)

        task = asyncio.create_task(workers.run(work, budget=budget, cancel=threading.Event(), grace=0.2))
        while not started.is_set():
            await asyncio.sleep(0.01)
        began = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert 0.15 <= time.monotonic() - began < 2 and not budget.locked()
        release.set()

    asyncio.run(main())


def test_housekeeping_runs_outside_budgets(workers):
    async def main() -> None:
        ran = threading.Event()
        await workers.housekeeping(ran.set)
        assert ran.is_set()

    asyncio.run(main())
