"""The scheduler with a fake engine: bounds, fairness, ordering, failure isolation."""

import asyncio
import threading
import time

import pytest

from server.core.scheduler import Scheduler
from server.errors import ASRError, ErrorCode


class FakeRunner:
    """Records every batch; items are (stream, seq); an item 'boom' fails its batch."""

    def __init__(self, step_seconds=0.0):
        self.batches = []
        self.step_seconds = step_seconds
        self.threads = set()

    def run_batch(self, items):
        self.threads.add(threading.get_ident())
        self.batches.append(list(items))
        if self.step_seconds:
            time.sleep(self.step_seconds)
        if any(item == "boom" for item in items):
            raise RuntimeError("kaboom")
        return [("done", item) for item in items]


async def started(runner, **kw):
    s = Scheduler(runner, **kw)
    await s.start()
    return s


async def submit(s, key, item, ready_at=None):
    """Queue ``item`` and wait for it: the runner's result and the chunk's timing."""
    future, timing = s.enqueue(key, item, ready_at)
    return await future, timing


async def test_results_come_back_to_their_submitters_on_one_other_thread():
    runner = FakeRunner()
    s = await started(runner, max_batch=4)
    results = await asyncio.gather(*(submit(s, i, (i, 0)) for i in range(10)))
    assert [r for r, _ in results] == [("done", (i, 0)) for i in range(10)]
    assert len(runner.threads) == 1 and threading.get_ident() not in runner.threads
    await s.stop()


async def test_batches_never_exceed_max_batch_and_take_the_oldest_ready_first():
    runner = FakeRunner(step_seconds=0.02)
    s = await started(runner, max_batch=3)
    now = time.monotonic()
    # submitted in one order, ready in the reverse order
    tasks = [asyncio.create_task(submit(s, i, i, ready_at=now - i)) for i in range(9)]
    await asyncio.gather(*tasks)
    assert all(len(b) <= 3 for b in runner.batches)
    flat = [item for b in runner.batches for item in b]
    # after the first batch (which may start before all are queued), oldest-ready goes first
    later = flat[len(runner.batches[0]):]
    assert later == sorted(later, reverse=True)
    await s.stop()


async def test_no_stream_starves_under_continuous_load():
    runner = FakeRunner(step_seconds=0.005)
    s = await started(runner, max_batch=2)
    served = {k: 0 for k in range(6)}

    async def stream(key):
        for seq in range(5):
            await submit(s, key, (key, seq))
            served[key] += 1

    await asyncio.wait_for(asyncio.gather(*(stream(k) for k in range(6))), 10)
    assert all(v == 5 for v in served.values())
    await s.stop()


async def test_a_stream_appears_once_per_batch_and_in_order():
    runner = FakeRunner(step_seconds=0.01)
    s = await started(runner, max_batch=8)
    # one stream submitting several chunks at once (not what sessions do, but must stay ordered)
    await asyncio.gather(*(submit(s, "a", ("a", i)) for i in range(5)))
    seen = [item for b in runner.batches for item in b]
    assert seen == [("a", i) for i in range(5)]
    assert all(len(b) == 1 for b in runner.batches)
    await s.stop()


async def test_a_stream_that_is_behind_brings_up_to_max_chunks_per_stream_in_order():
    runner = FakeRunner(step_seconds=0.02)
    s = await started(runner, max_batch=8, max_chunks_per_stream=3)
    first = asyncio.create_task(submit(s, "x", ("x", 0)))  # occupies the engine while the rest queue
    await asyncio.sleep(0.005)
    now = time.monotonic()
    behind = [asyncio.create_task(submit(s, "a", ("a", i), ready_at=now + i * 1e-3)) for i in range(7)]
    others = [asyncio.create_task(submit(s, k, (k, 0), ready_at=now + 0.0035)) for k in "bc"]
    await asyncio.gather(first, *behind, *others)
    later = runner.batches[1:]
    assert [[i for k, i in b if k == "a"] for b in later] == [[0, 1, 2], [3, 4, 5], [6]]
    assert {k for k, _ in later[0]} == {"a", "b", "c"}  # the others ride along, oldest first
    assert later[0] == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("c", 0)]
    await s.stop()


async def test_a_failing_batch_fails_only_its_own_items_and_the_loop_goes_on():
    runner = FakeRunner(step_seconds=0.01)
    s = await started(runner, max_batch=2)
    first = asyncio.create_task(submit(s, "x", "slow"))  # occupies the engine
    await asyncio.sleep(0.002)
    bad = asyncio.create_task(submit(s, "a", "boom"))
    neighbour = asyncio.create_task(submit(s, "b", "fine"))
    later = asyncio.create_task(submit(s, "c", "later"))
    assert (await first)[0] == ("done", "slow")
    with pytest.raises(ASRError) as info:
        await bad
    assert info.value.code is ErrorCode.INTERNAL and "kaboom" in info.value.message
    with pytest.raises(ASRError):
        await neighbour  # same batch as the failure
    assert (await later)[0] == ("done", "later")
    assert (await submit(s, "d", "after"))[0] == ("done", "after")
    await s.stop()


async def test_withdrawn_chunks_are_skipped():
    runner = FakeRunner(step_seconds=0.02)
    s = await started(runner, max_batch=1)
    blocker = asyncio.create_task(submit(s, "x", "first"))
    await asyncio.sleep(0.005)
    gone = asyncio.create_task(submit(s, "y", "withdrawn"))
    await asyncio.sleep(0.001)
    gone.cancel()
    await blocker
    await submit(s, "z", "next")
    assert "withdrawn" not in [i for b in runner.batches for i in b]
    await s.stop()


async def test_max_wait_fills_a_batch():
    runner = FakeRunner()
    s = await started(runner, max_batch=4, max_wait=0.05)
    await asyncio.gather(*(submit(s, i, i) for i in range(4)))
    assert runner.batches[0] == [0, 1, 2, 3]
    await s.stop()


async def test_timing_is_recorded():
    runner = FakeRunner(step_seconds=0.01)
    s = await started(runner)
    _, timing = await submit(s, "a", 1, ready_at=time.monotonic() - 0.05)
    assert timing.queue_wait >= 0.05 and timing.compute >= 0.01 and timing.batch_size == 1
    await s.stop()


async def test_stop_fails_queued_items_with_unavailable():
    runner = FakeRunner(step_seconds=0.05)
    s = await started(runner, max_batch=1)
    a = asyncio.create_task(submit(s, "a", 1))
    b = asyncio.create_task(submit(s, "b", 2))
    await asyncio.sleep(0.01)
    await s.stop()
    for task in (a, b):
        try:
            await task
        except ASRError as exc:
            assert exc.code is ErrorCode.UNAVAILABLE
