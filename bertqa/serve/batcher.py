"""Dynamic batching: the windows of concurrent requests gathered into engine calls (DynamicBatcher).

Every request's windows go through one queue; when the engine is free a batcher task takes the oldest and
gathers more, up to max_batch_size windows: those already queued, and, while other requests are still being
received or tokenized and the batch holds fewer than FILL_TOKENS real tokens (past which the engine's rate per
token no longer grows), those that arrive within max_wait_ms (counted from when the engine became free for this
batch, or from when the oldest was queued if that is later). A lone request never waits; under load windows pile
up while the engine works and the next batch takes them. It runs them in a single engine thread (the engine
releases the GIL; one call at a time because its OpenMP pool already uses every core). The CPU engine computes
no padding (it packs the rows), so a batch is one engine call whatever its windows' lengths; for an engine that
does compute padding (the GPU's), windows are sorted by length and cut into the calls that cost least (a fixed
cost per call plus rows x padded width; DynamicBatcher.group_rows). A window's logits do not depend on what it
was batched with (padding is masked out, and positions past its last token read -inf).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence

import numpy as np

log = logging.getLogger("bertqa.serve")


class QueueFull(Exception):
    pass


# The fixed cost of one engine call (Python -> C, one OpenMP barrier per kernel, small-matrix inefficiency) in
# units of the compute of one token, for DynamicBatcher.group_rows. Measured for all-MiniLM-L6-v2 on 2 cores:
# 1 x 32 tokens costs about as much as 4 x 32 in one call under load; 64 is a middle value (the split between
# calls is not sensitive to it within a factor of 2).
CALL_OVERHEAD_TOKENS = 64

# A batch stops waiting for more requests once it holds this many real tokens: the engine's rate per token
# saturates there (all-MiniLM-L6-v2 on 2 cores: one 48-token window runs at ~60% of the tokens/s of eight, one
# 176-token window at ~70-80%; past ~400-500 tokens per call the rate is flat), so waiting longer would only
# idle the engine. Windows already queued still join, up to max_batch_size.
FILL_TOKENS = 512


class _Chunk:
    """Up to max_batch_size windows of one request, waiting for the engine."""

    __slots__ = ("input_ids", "attention_mask", "token_type_ids", "future", "enqueued", "tokens")

    def __init__(self, input_ids, attention_mask, token_type_ids, future, enqueued):
        self.input_ids, self.attention_mask, self.token_type_ids = input_ids, attention_mask, token_type_ids
        self.future, self.enqueued = future, enqueued
        self.tokens = int(np.count_nonzero(attention_mask))

    @property
    def n(self) -> int:
        return int(self.input_ids.shape[0])


_STOP = object()


class DynamicBatcher:
    """Gathers the windows of concurrent requests into engine calls of at most max_batch_size windows.

    When the engine is free, the oldest waiting chunk opens a batch; chunks already queued join while they fit,
    and while `others_coming()` says more requests are on their way (being received or tokenized) and the batch
    holds fewer than fill_tokens real tokens, the batch waits for them until max_wait_ms after the later of: the
    oldest chunk was queued, the engine became free. A lone request therefore never waits, and a batch never
    idles the engine for requests it does not need to run efficiently. With enabled=False every chunk is its
    own engine call. `forward(input_ids, attention_mask, token_type_ids)` runs in one dedicated thread.
    skips_padding: the engine computes no padding (the CPU engine packs the rows), so a batch is one call
    whatever its rows' lengths; otherwise group_rows cuts it by length.
    """

    def __init__(self, forward: Callable, max_batch_size: int = 16, max_wait_ms: float = 5.0, enabled: bool = True,
                 max_queue: int = 2048, pad_token_id: int = 0, pad_to_multiple_of: int = 8,
                 call_overhead_tokens: int = CALL_OVERHEAD_TOKENS, skips_padding: bool = False,
                 fill_tokens: int = FILL_TOKENS, others_coming: Callable[[], bool] = lambda: True):
        self.forward = forward
        self.max_batch_size = int(max_batch_size)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.enabled = enabled
        self.max_queue = int(max_queue)
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = int(pad_to_multiple_of)
        self.call_overhead_tokens = int(call_overhead_tokens)
        self.skips_padding = bool(skips_padding)
        self.fill_tokens = int(fill_tokens)
        self.others_coming = others_coming
        self.queued = 0  # windows waiting (not yet in an engine call)
        self.calls = 0
        self.windows = 0
        self.batch_sizes: dict[int, int] = {}
        self.engine_seconds = 0.0
        self._queue: Optional[asyncio.Queue] = None
        self._task: Optional[asyncio.Task] = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="bertqa-engine")

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="bertqa-batcher")

    async def stop(self) -> None:
        """Run what is queued, then stop (the server has finished its requests by now)."""
        if self._task is not None:
            self._queue.put_nowait(_STOP)
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._executor.shutdown(wait=True)

    def stats(self) -> dict[str, Any]:
        return {"engine_calls": self.calls, "windows": self.windows,
                "mean_batch_size": self.windows / self.calls if self.calls else 0.0,
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "engine_seconds": round(self.engine_seconds, 3), "queued_windows": self.queued,
                "max_batch_size": self.max_batch_size, "max_wait_ms": self.max_wait * 1000,
                "batching": self.enabled}

    async def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
        """(start, end) logits [N, T] of N windows; cancelling the caller drops its windows not yet started."""
        n, width = input_ids.shape
        if self.queued + n > self.max_queue:
            raise QueueFull(f"{self.queued} windows are already waiting for the engine (limit {self.max_queue}, "
                            f"BERTQA_MAX_QUEUE)")
        loop = asyncio.get_running_loop()
        now = loop.time()
        futures = []
        for lo in range(0, n, self.max_batch_size):
            sl = slice(lo, lo + self.max_batch_size)
            fut = loop.create_future()
            self._queue.put_nowait(_Chunk(input_ids[sl], attention_mask[sl], token_type_ids[sl], fut, now))
            self.queued += min(self.max_batch_size, n - lo)
            futures.append(fut)
        try:
            parts = await asyncio.gather(*futures)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        start = np.full((n, width), -np.inf, dtype=np.float32)
        end = np.full((n, width), -np.inf, dtype=np.float32)
        lo = 0
        for s, e in parts:
            w = min(s.shape[1], width)
            start[lo:lo + len(s), :w], end[lo:lo + len(s), :w] = s[:, :w], e[:, :w]
            lo += len(s)
        return start, end

    async def _next(self, timeout: Optional[float]):
        if timeout is None:
            return await self._queue.get()
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            pass
        if timeout <= 0:
            return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        carry = None
        stopping = False
        while True:
            if carry is not None:
                first, carry = carry, None
            elif stopping:
                break
            else:
                first = await self._next(None)
            if first is _STOP:
                stopping = True
                continue
            if self._drop_if_cancelled(first):
                continue
            batch, rows, tokens = [first], first.n, first.tokens
            if self.enabled:
                deadline = max(first.enqueued, loop.time()) + self.max_wait
                while rows < self.max_batch_size:
                    wait = tokens < self.fill_tokens and self.others_coming()
                    item = await self._next(deadline - loop.time() if wait else 0.0)
                    if item is None:
                        break
                    if item is _STOP:
                        stopping = True
                        break
                    if self._drop_if_cancelled(item):
                        continue
                    if rows + item.n > self.max_batch_size:
                        carry = item
                        break
                    batch.append(item)
                    rows += item.n
                    tokens += item.tokens
            await self._execute(batch, rows)

    def _drop_if_cancelled(self, chunk: _Chunk) -> bool:
        if chunk.future.cancelled():
            self.queued -= chunk.n
            return True
        return False

    async def _execute(self, batch: list[_Chunk], rows: int) -> None:
        self.queued -= rows
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            await loop.run_in_executor(self._executor, self._run_batch, batch, loop)
        except Exception as e:  # the engine failed: the requests of the batch not yet answered get the error
            log.exception("engine call on %d windows failed", rows)
            for c in batch:
                if not c.future.done():
                    c.future.set_exception(e)
        finally:
            self.engine_seconds += time.perf_counter() - t0

    def group_rows(self, lengths: Sequence[int]) -> list[list[int]]:
        """Rows (indices into lengths) per engine call, the call of shortest rows first; all in one call when the
        engine skips padding.

        A call costs about call_overhead_tokens + rows x width tokens of compute (width: its longest row rounded
        up to pad_to_multiple_of; padding is paid in full on a CPU). The rows sorted by length are cut into the
        consecutive runs that minimise the total cost (dynamic programming, n <= max_batch_size): windows of
        similar length share one call, and a batch of very different lengths runs as a few calls rather than one
        padded to the longest. The shortest call runs first so that its requests are answered soonest.
        """
        if self.skips_padding:
            return [list(range(len(lengths)))]
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        n = len(order)
        widths = [-(-max(lengths[i], 1) // self.pad_to_multiple_of) * self.pad_to_multiple_of for i in order]
        best = [0.0] + [math.inf] * n  # best[j]: cost of rows order[:j]
        cut = [0] * (n + 1)
        for j in range(1, n + 1):
            for i in range(j):  # last call = order[i:j], padded to widths[i] (its longest row)
                cost = best[i] + self.call_overhead_tokens + (j - i) * widths[i]
                if cost < best[j]:
                    best[j], cut[j] = cost, i
        groups, j = [], n
        while j > 0:
            groups.append([order[k] for k in range(cut[j], j)])
            j = cut[j]
        return groups  # built from the shortest rows backwards: shortest call first

    def _run_batch(self, batch: list[_Chunk], loop: asyncio.AbstractEventLoop) -> None:
        """In the engine thread: the engine calls of one batch; each chunk's future gets (start, end) [n, T_chunk]
        (-inf past each row's last token) as soon as its last row is done."""
        rows = [(c, r) for c in range(len(batch)) for r in range(batch[c].n)]
        lengths = [int(batch[c].attention_mask[r].sum()) for c, r in rows]
        outputs = [(np.full(ch.input_ids.shape, -np.inf, dtype=np.float32),
                    np.full(ch.input_ids.shape, -np.inf, dtype=np.float32)) for ch in batch]
        left = [ch.n for ch in batch]
        for group in self.group_rows(lengths):
            if all(batch[rows[i][0]].future.cancelled() for i in group):
                continue
            width = -(-max(max(lengths[i] for i in group), 1) // self.pad_to_multiple_of) * self.pad_to_multiple_of
            ids = np.full((len(group), width), self.pad_token_id, dtype=np.int32)
            mask = np.zeros((len(group), width), dtype=np.int32)
            types = np.zeros((len(group), width), dtype=np.int32)
            for j, i in enumerate(group):
                (c, r), n = rows[i], lengths[i]
                ids[j, :n] = batch[c].input_ids[r, :n]
                mask[j, :n] = 1
                types[j, :n] = batch[c].token_type_ids[r, :n]
            start, end = self.forward(ids, attention_mask=mask, token_type_ids=types)
            start, end = np.asarray(start, dtype=np.float32), np.asarray(end, dtype=np.float32)
            finished = []
            for j, i in enumerate(group):
                (c, r), n = rows[i], lengths[i]
                outputs[c][0][r, :n] = start[j, :n]
                outputs[c][1][r, :n] = end[j, :n]
                left[c] -= 1
                if left[c] == 0:
                    finished.append(c)
            loop.call_soon_threadsafe(self._deliver, [(batch[c].future, outputs[c]) for c in finished], len(group))

    def _deliver(self, results, size: int) -> None:
        self.calls += 1
        self.windows += size
        self.batch_sizes[size] = self.batch_sizes.get(size, 0) + 1
        for future, out in results:
            if not future.done():
                future.set_result(out)
