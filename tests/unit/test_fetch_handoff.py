"""Arrivals handed from PACS threads to the event loop (``SeriesFetch.arrive_from_thread``): every
instance arrives, in order, and a burst that comes while the loop is busy costs one wake-up of it."""

from __future__ import annotations

import asyncio
import threading

from cache.spool import Spool
from gateway.retrieval.fetch import InstanceRef, Manifest, SeriesFetch
from translators.uids import SeriesId

TS, CT = "1.2.840.10008.1.2.1", "1.2.840.10008.5.1.4.1.1.2"
UIDS = [f"1.2.3.4.{i}" for i in range(1, 201)]


def test_arrivals_from_threads_all_arrive_in_order_and_a_burst_wakes_the_loop_once(tmp_path):
    spool = Spool(tmp_path, 1 << 30)

    async def main() -> tuple[list[str], int, int]:
        loop = asyncio.get_running_loop()
        manifest = Manifest(SeriesId("a", "1.2.3", "1.2.3.4"), [InstanceRef(u, CT, i) for i, u in enumerate(UIDS)])
        fetch = SeriesFetch(loop, manifest, spool)
        wakeups = 0
        original = loop.call_soon_threadsafe

        def counted(callback, *args, **kwargs):  # type: ignore[no-untyped-def]
            nonlocal wakeups
            if callback == fetch._take_handoff:   # not asyncio.to_thread's own hand-backs
                wakeups += 1
            return original(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]

        def pacs(uids: list[str]) -> None:   # an association thread: spool, then hand over
            for uid in uids:
                entry = spool.write(b"DICM" + uid.encode(), manifest.instance_id(uid), sop_class_uid=CT,
                                    transfer_syntax=TS, pin=True)
                fetch.arrive_from_thread(uid, entry)

        # The loop is busy (this coroutine holds it) while the first 100 arrive: one wake-up for them.
        burst = threading.Thread(target=pacs, args=(UIDS[:100],))
        burst.start()
        burst.join()
        after_burst = wakeups
        # Let the loop take the burst before the next phase: a thread started while the burst still
        # waited would join it (correctly, with no wake-up of its own) and the count below would miss it.
        while len(fetch.arrived) < 100:
            await asyncio.sleep(0)
        # Then one at a time, the loop free between them: each one wakes it.
        for uid in UIDS[100:]:
            await asyncio.to_thread(pacs, [uid])
            await asyncio.sleep(0)
        while len(fetch.arrived) < len(UIDS):
            await asyncio.sleep(0.001)
        return list(fetch.arrived), after_burst, wakeups

    arrived, after_burst, wakeups = asyncio.run(main())
    assert arrived == UIDS                      # all of them, in the order they were spooled
    assert after_burst == 1                     # the burst: one wake-up
    assert wakeups == 1 + 100                   # one at a time, the loop idle: one each
    spool.close()
