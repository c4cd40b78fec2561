"""Server-side request batching: concurrent requests are queued and merged into one model call.

A simplified TF Serving ``BatchingSession``: requests whose inputs can be concatenated (same model version, same
signature, same per-row shapes and dtypes: the *batch key*) wait in a queue; a scheduler hands the queue to one of
``num_batch_threads`` worker threads as one batch of at most ``max_batch_size`` rows, either when the batch is full,
when its oldest request has waited ``batch_timeout_ms``, or, with the default timeout of 0, as soon as a worker is
free. Requests that arrive while every worker is busy therefore pile up and run together: under load the model
sees large batches, with one client it sees batches of one and no added latency.

The model runs off the event loop, in a thread pool; so does the per-request post-processing (JSON encoding of the
outputs), so that the loop only moves bytes. If a merged batch fails, each of its requests is retried alone, so
one bad request cannot fail its neighbours.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import threading
from typing import Any, Callable, Hashable, Mapping

import numpy as np

RunFn = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]
PostFn = Callable[[Mapping[str, np.ndarray]], Any]


class QueueFullError(RuntimeError):
    """The batching queue holds ``max_enqueued_rows`` rows already; the request should be retried later (503)."""


@dataclasses.dataclass
class _Item:
    inputs: Mapping[str, np.ndarray]
    rows: int
    run: RunFn
    post: PostFn | None
    future: asyncio.Future
    enqueued: float


class BatchScheduler:
    """Merges concurrent :meth:`submit` calls with the same key into one call of their ``run`` function.

    Args:
      max_batch_size: most rows (images) per model call; a single larger request runs alone, in consecutive
        calls of at most this many rows (so that one request never makes the model allocate for more).
      batch_timeout_ms: how long the oldest queued request may wait for others to fill its batch while a worker
        is free (TF Serving's ``batch_timeout_micros``); 0 dispatches as soon as a worker is free.
      num_batch_threads: model calls that may run at once (TF Serving's ``num_batch_threads``).
      max_enqueued_rows: queued rows beyond which :meth:`submit` raises :class:`QueueFullError`.
    """

    def __init__(
        self,
        *,
        max_batch_size: int = 32,
        batch_timeout_ms: float = 0.0,
        num_batch_threads: int = 2,
        max_enqueued_rows: int = 4096,
    ):
        if max_batch_size < 1 or num_batch_threads < 1 or batch_timeout_ms < 0 or max_enqueued_rows < 1:
            raise ValueError("max_batch_size, num_batch_threads, max_enqueued_rows must be >= 1, timeout >= 0")
        self.max_batch_size = int(max_batch_size)
        self.batch_timeout = float(batch_timeout_ms) / 1000.0
        self.num_batch_threads = int(num_batch_threads)
        self.max_enqueued_rows = int(max_enqueued_rows)
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._queues: dict[Hashable, collections.deque[_Item]] = {}
        self._queued_rows = 0
        self._wakeup: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        #: Counters for tests and the benchmark: model calls made and rows they processed.
        self.stats = {"batches": 0, "rows": 0, "max_rows": 0, "retried_alone": 0}

    # ------------------------------------------------------------------------------------------------ public
    async def submit(
        self, key: Hashable, inputs: Mapping[str, np.ndarray], rows: int, run: RunFn, post: PostFn | None = None
    ) -> Any:
        """Queue one request; return ``post(outputs)`` (or the outputs) for its rows once its batch has run.

        ``key`` must be equal only for requests whose inputs can be concatenated along axis 0 and that use the
        same ``run``; pass a unique key (e.g. ``object()``) for a request that must run alone.
        """
        self._ensure_started()
        if self._queued_rows + rows > self.max_enqueued_rows and self._queued_rows > 0:
            raise QueueFullError(f"the batching queue is full ({self._queued_rows} rows waiting); retry later")
        loop = asyncio.get_running_loop()
        item = _Item(inputs, int(rows), run, post, loop.create_future(), loop.time())
        self._queues.setdefault(key, collections.deque()).append(item)
        self._queued_rows += item.rows
        self._wakeup.set()
        return await item.future

    def executor(self) -> concurrent.futures.ThreadPoolExecutor:
        """The worker pool (created on first use; recreated after :meth:`close`)."""
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.num_batch_threads, thread_name_prefix="oneimage-batch"
                )
            return self._executor

    def close(self) -> None:
        """Stop the scheduler task and the worker pool (a later :meth:`submit` starts them again)."""
        if self._task is not None and self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._task.cancel)
            except RuntimeError:
                pass
        self._task = None
        self._loop = None
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None

    # ------------------------------------------------------------------------------------------------ internals
    def _ensure_started(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._task is not None and not self._task.done():
            return
        # First use, or a new event loop (e.g. a test client restarted the app): fresh loop-bound state.
        self._loop = loop
        self._queues = {}
        self._queued_rows = 0
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self.num_batch_threads)
        self._task = loop.create_task(self._schedule())

    def _rows_queued(self, key: Hashable) -> int:
        return sum(item.rows for item in self._queues.get(key, ()))

    def _take(self, key: Hashable) -> list[_Item]:
        queue = self._queues[key]
        batch = [queue.popleft()]
        rows = batch[0].rows
        while queue and rows + queue[0].rows <= self.max_batch_size:
            item = queue.popleft()
            batch.append(item)
            rows += item.rows
        if not queue:
            del self._queues[key]
        self._queued_rows -= rows
        return batch

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queues:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            key = min(self._queues, key=lambda k: self._queues[k][0].enqueued)
            deadline = self._queues[key][0].enqueued + self.batch_timeout
            while self._rows_queued(key) < self.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            # Waiting for a free worker is what lets requests pile up into big batches under load.
            await self._slots.acquire()
            if key not in self._queues:  # cannot happen (only this task removes items), but stay safe
                self._slots.release()
                continue
            batch = self._take(key)
            loop.create_task(self._execute(batch))

    async def _execute(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self.executor(), self._run_batch, batch)
        except BaseException as exc:  # executor shut down, cancelled: fail the waiting requests
            results = [exc] * len(batch)
        finally:
            self._slots.release()
            self._wakeup.set()
        for item, result in zip(batch, results):
            if item.future.done():
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)

    def _run_batch(self, batch: list[_Item]) -> list[Any]:
        """Worker thread: one model call for the whole batch, then each request's post-processing."""
        if len(batch) == 1:
            return [self._run_alone(batch[0])]
        total = sum(item.rows for item in batch)
        try:
            merged = {name: np.concatenate([item.inputs[name] for item in batch]) for name in batch[0].inputs}
            outputs = batch[0].run(merged)
            if any(np.shape(value)[:1] != (total,) for value in outputs.values()):
                raise ValueError("an output's first dimension is not the batch")
        except Exception:
            with self._lock:
                self.stats["retried_alone"] += 1
            return [self._run_alone(item) for item in batch]
        self._count(total)
        results: list[Any] = []
        start = 0
        for item in batch:
            part = {name: value[start : start + item.rows] for name, value in outputs.items()}
            start += item.rows
            try:
                results.append(item.post(part) if item.post is not None else part)
            except Exception as exc:
                results.append(exc)
        return results

    def _run_alone(self, item: _Item) -> Any:
        try:
            if item.rows <= self.max_batch_size:
                outputs = item.run(item.inputs)
                self._count(item.rows)
            else:
                parts = []
                for start in range(0, item.rows, self.max_batch_size):
                    stop = min(start + self.max_batch_size, item.rows)
                    part = item.run({name: value[start:stop] for name, value in item.inputs.items()})
                    if any(np.shape(value)[:1] != (stop - start,) for value in part.values()):
                        raise ValueError("an output's first dimension is not the batch; send at most "
                                         f"{self.max_batch_size} rows per request")
                    parts.append(part)
                    self._count(stop - start)
                outputs = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
            return item.post(outputs) if item.post is not None else outputs
        except Exception as exc:
            return exc

    def _count(self, rows: int) -> None:
        with self._lock:
            self.stats["batches"] += 1
            self.stats["rows"] += rows
            self.stats["max_rows"] = max(self.stats["max_rows"], rows)
