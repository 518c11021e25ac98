"""Continuous batching of ready chunks from all streams onto one inference thread.

Sessions ``enqueue`` a chunk when its audio is complete and await its future.
Whenever the engine is free, the scheduler takes up to ``max_batch`` queued
chunks, in the order of their rank (so no stream starves), at most
``max_chunks_per_stream`` consecutive ones of a stream (in the stream's order: a
stream that is behind catches up in one step), optionally waiting up to
``max_wait`` seconds for a fuller batch, and runs them as one ``runner.run_batch``
call on its single inference thread, so the asyncio loop never blocks on the model.

Fairness: a chunk's rank is when it was ready, or, for a stream sent ahead of real time, when
it would have been had the audio come in real time (``due_at``; a file sent as fast as possible
has all its chunks ready at once). Chunks due later than now are *ahead*: they rank behind every
fresh chunk and join a step only while it holds fewer than ``ahead_batch()`` chunks (the batch
whose step still leaves real-time streams their latency), so one client's backlog never
delays anyone's fresh chunks; it runs on the engine's spare capacity. With no real-time chunk
queued for ``REALTIME_GONE_S``, ahead chunks fill whole batches.

A batch that raises fails only its own chunks' futures, with an ``INTERNAL``
``ASRError``; the loop goes on serving everyone else. The scheduler moves
opaque items and futures: it knows nothing of torch or gRPC, so it is tested
with a fake runner.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Protocol, Sequence

from server.errors import ASRError, ErrorCode
from server.types import BatchRecord

log = logging.getLogger(__name__)

YIELDS_AFTER_BATCH = 3  # event-loop turns between a batch's results and the next batch
REALTIME_GONE_S = 0.5  # no chunk due at real-time pace for this long: no stream needs fairness


class BatchRunner(Protocol):
    def run_batch(self, items: list[Any]) -> Sequence[Any]:
        """Process ``items`` (a stream's items in its order, at most ``max_chunks_per_stream`` of
        them); one result (or Exception) per item, in order."""


@dataclass
class JobTiming:
    """When a chunk was ready, started and finished (``time.monotonic()`` seconds)."""

    ready_at: float
    started_at: float = 0.0
    finished_at: float = 0.0
    batch_size: int = 0

    @property
    def queue_wait(self) -> float:
        return self.started_at - self.ready_at

    @property
    def compute(self) -> float:
        return self.finished_at - self.started_at


@dataclass(order=True)
class _Job:
    rank: float  # max(ready_at, due_at): the order chunks are taken in
    seq: int
    key: Hashable = field(compare=False)
    item: Any = field(compare=False)
    future: asyncio.Future = field(compare=False)
    timing: JobTiming = field(compare=False)


def engine_thread() -> ThreadPoolExecutor:
    """The single inference thread. Run *all* of a process's torch work on it (loading,
    warm-up, steps): measured here, once a second thread has run torch's OpenMP-parallel
    operators, small operators on every thread cost about twice as much (the engine step's
    fixed cost nearly doubles)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")


class Scheduler:
    def __init__(self, runner: BatchRunner, max_batch: int = 32, max_wait: float = 0.0,
                 on_batch: Callable[[BatchRecord], None] | None = None,
                 executor: ThreadPoolExecutor | None = None, max_chunks_per_stream: int = 1,
                 ahead_batch: Callable[[], int] | None = None):
        if max_batch < 1 or max_chunks_per_stream < 1:
            raise ValueError("max_batch and max_chunks_per_stream must be >= 1")
        self.runner = runner
        self.max_batch = max_batch
        self.max_chunks_per_stream = max_chunks_per_stream
        self.max_wait = max_wait
        self.ahead_batch = ahead_batch or (lambda: max_batch)  # see the module docstring: fairness
        self._due_enqueued_at = -1e9  # when a chunk not ahead of real time was last queued
        self.on_batch = on_batch
        self._queue: list[_Job] = []
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = executor  # owned: shut down by stop()
        self._task: asyncio.Task | None = None
        self.batches_run = 0

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        if self._executor is None:
            self._executor = engine_thread()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="scheduler")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for job in self._queue:
            if not job.future.done():
                job.future.set_exception(ASRError(ErrorCode.UNAVAILABLE, "server is shutting down"))
        self._queue.clear()
        if self._executor:
            self._executor.shutdown(wait=True)
            self._executor = None

    # --- API for sessions ----------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def queued_streams(self) -> int:
        """Streams with a chunk due and waiting (chunks ahead of real time are not a backlog)."""
        now = time.monotonic()
        return len({job.key for job in self._queue if not job.future.done() and job.rank <= now})

    def enqueue(self, key: Hashable, item: Any, ready_at: float | None = None,
                due_at: float = 0.0) -> tuple[asyncio.Future, JobTiming]:
        """Queue ``item`` of stream ``key`` now; the future resolves to the runner's result (cancel
        it to withdraw a queued item; an item already in a running batch completes and its result
        is dropped), the timing fills in as it runs. ``due_at``: when the item would have been
        ready at real-time pace (later than ``ready_at`` for a stream sent ahead of it)."""
        if self._task is None:
            raise ASRError(ErrorCode.UNAVAILABLE, "scheduler is not running")
        timing = JobTiming(ready_at if ready_at is not None else time.monotonic())
        future = asyncio.get_running_loop().create_future()
        rank = max(timing.ready_at, due_at)
        now = time.monotonic()
        if rank <= now:
            self._due_enqueued_at = now
        heapq.heappush(self._queue, _Job(rank, next(self._seq), key, item, future, timing))
        self._wakeup.set()
        return future, timing

    async def run_on_engine_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a control call (e.g. freeing a stream's state) on the inference thread,
        serialised with the batches."""
        if self._executor is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def call_soon_on_engine_thread(self, fn: Callable[..., Any], *args: Any) -> None:
        """Like ``run_on_engine_thread`` without waiting: safe in cleanup paths, even while
        the calling task is being cancelled."""
        try:
            if self._executor is not None:
                self._executor.submit(fn, *args)
                return
        except RuntimeError:  # executor already shut down: no batch can be running
            pass
        fn(*args)

    # --- the loop ------------------------------------------------------------------------
    def _take_batch(self) -> list[_Job]:
        batch: list[_Job] = []
        taken: dict = {}  # key -> chunks of that stream in the batch
        blocked: set = set()  # streams with a chunk deferred: their later chunks wait too
        deferred: list[_Job] = []
        now = time.monotonic()
        ahead_limit = None
        while self._queue and len(batch) < self.max_batch:
            job = heapq.heappop(self._queue)
            if job.future.done():  # withdrawn by its session
                continue
            if job.rank > now and now - self._due_enqueued_at < REALTIME_GONE_S:  # ahead, as is what follows
                ahead_limit = self.ahead_batch() if ahead_limit is None else ahead_limit
                if len(batch) >= ahead_limit:
                    deferred.append(job)
                    break
            if job.key in blocked or taken.get(job.key, 0) >= self.max_chunks_per_stream:
                blocked.add(job.key)  # the stream's next chunks wait for the next step
                deferred.append(job)
                continue
            taken[job.key] = taken.get(job.key, 0) + 1
            batch.append(job)
        for job in deferred:
            heapq.heappush(self._queue, job)
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            if self.max_wait > 0 and len(self._queue) < self.max_batch:
                await asyncio.sleep(self.max_wait)
            batch = self._take_batch()
            if not self._queue:
                self._wakeup.clear()
            if not batch:
                continue
            started = time.monotonic()
            for job in batch:
                job.timing.started_at = started
                job.timing.batch_size = len(batch)
            failed = False
            try:
                results = await loop.run_in_executor(self._executor, self.runner.run_batch,
                                                     [job.item for job in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"runner returned {len(results)} results for {len(batch)} items")
            except asyncio.CancelledError:
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(ASRError(ErrorCode.UNAVAILABLE, "server is shutting down"))
                raise
            except Exception as exc:  # the batch fails; its streams get INTERNAL, the loop goes on
                failed = True
                log.exception("engine step failed for a batch of %d", len(batch))
                error = ASRError(ErrorCode.INTERNAL, f"recognition failed: {type(exc).__name__}: {exc}")
                results = [error] * len(batch)
            finished = time.monotonic()
            self.batches_run += 1
            for job, result in zip(batch, results):
                job.timing.finished_at = finished
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
            # Let the streams just served queue their next chunk before the next batch forms:
            # a stream that is behind real time has it ready, and it would otherwise miss the
            # next step and wait a whole one more (resolving a future only schedules the
            # awaiting task; it runs, and queues, on the loop's next iterations).
            for _ in range(YIELDS_AFTER_BATCH):
                await asyncio.sleep(0)
            if self.on_batch:
                self.on_batch(BatchRecord(len(batch), finished - started, failed,
                                          results, len({job.key for job in batch})))
