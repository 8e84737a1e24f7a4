"""The model service of one server process (QAService): loads the model, answers one request at a time through
the pipeline and the batcher.

A request's windows are the same doc-stride windows as training (questions cut to max_query_length tokens); the
answer is the best span over all windows (bertqa.inference), "score" its probability among the n-best spans.
Tokenizing, span decoding and JSON run in a small thread pool, so the event loop never waits on them. Before
tokenizing, a request's windows are bounded from below without the tokenizer (contract.check_windows_bound): one
over BERTQA_MAX_WINDOWS by that bound is refused in a fraction of the time and memory tokenizing it would take.
After a large request the C heap is trimmed (malloc_trim), so the server's memory returns to where it was.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

import numpy as np

from ..inference import QAPipeline, TooMuchWork
from .batcher import DynamicBatcher, QueueFull
from .contract import ParsedRequest, RequestError, check_windows_bound, parse_request, render_results
from .settings import ServeConfig

log = logging.getLogger("bertqa.serve")

TRIM_AFTER_BYTES = 256 * 1024  # after a request body this large, the heap is trimmed once it is answered


def _malloc_trim() -> Callable[[], Any]:
    """glibc's malloc_trim(0) (all arenas since glibc 2.8: the thread pool's too), or a no-op elsewhere."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
        return lambda: trim(0)
    return lambda: 0


_trim_heap = _malloc_trim()


def load_model(model_dir: str, device: str = "cpu", precision: Optional[str] = None):
    """The engine: bertqa.model.BertQA from a folder, an archive or a packaged model name, in `precision` (None:
    the device's default)."""
    from ..model import BertQA
    from ..packaging import ModelDir

    holder = ModelDir(model_dir)
    try:
        return BertQA.from_pretrained(str(holder.folder), device=device, precision=precision)
    finally:
        holder.close()  # the engine holds its weights in memory; the unpacked files are not needed


class QAService:
    """State of one server process: config, model (once loaded), pipeline, batcher, thread pool."""

    def __init__(self, config: ServeConfig, model_loader: Optional[Callable[[], Any]] = None):
        self.config = config
        self.model_loader = model_loader or (lambda: load_model(config.model_dir, config.device, config.precision))
        self.pipeline: Optional[QAPipeline] = None
        self.batcher: Optional[DynamicBatcher] = None
        self.load_error: Optional[str] = None
        self.on_load_error: Optional[Callable[[], None]] = None
        self.cpu = ThreadPoolExecutor(2, thread_name_prefix="bertqa-cpu")
        self.inflight = 0  # requests between their headers and their answer
        self.on_the_way = 0  # requests being received or tokenized: their windows are not queued yet
        self.cheap_bound = False  # the model's tokenizer is BERT's: contract.min_tokens holds for it
        self.precision: Optional[str] = None  # the loaded model's (GET /stats)

    @property
    def loaded(self) -> bool:
        return self.batcher is not None

    async def startup(self) -> None:
        self._load_task = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            model, pipeline = await asyncio.get_running_loop().run_in_executor(self.cpu, self._load_sync)
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("could not load the model from %s: %s", self.config.model_dir, self.load_error)
            if self.on_load_error is not None:
                self.on_load_error()
            return
        c = self.config
        batcher = DynamicBatcher(model.forward, c.max_batch_size, c.max_wait_ms, c.batching, c.max_queue,
                                 pad_token_id=model.tokenizer.pad_token_id,
                                 skips_padding=bool(getattr(model, "skips_padding", False)),
                                 others_coming=lambda: self.on_the_way > 0)
        batcher.start()
        self.cheap_bound = _is_bert_wordpiece(model.tokenizer)
        self.precision = getattr(model, "precision", None)
        self.pipeline, self.batcher = pipeline, batcher
        log.info("model loaded from %s in %.1f s; %s, precision %s; max_seq_length %d, batching %s (max %d windows, "
                 "%.1f ms)", c.model_dir, time.perf_counter() - t0, c.device, self.precision,
                 pipeline.max_seq_length, "on" if c.batching else "off", c.max_batch_size, c.max_wait_ms)

    def _load_sync(self):
        c = self.config
        if c.num_threads is not None or c.workers > 1:
            with contextlib.suppress(Exception):
                from .. import ops
                ops.set_num_threads(c.num_threads or max(1, (os.cpu_count() or 1) // c.workers))
        model = self.model_loader()
        pipeline = QAPipeline(model, c.max_seq_length, c.doc_stride, c.max_query_length, c.max_answer_length,
                              c.n_best_size)
        # Warm-up before /ping says yes: one engine call at the largest shape the batcher can send, so the
        # engine's activation arena (which only grows) is allocated now, memory stays flat under load, and a
        # machine too small for it fails here rather than mid-traffic; then one request through the pipeline.
        B, T = c.max_batch_size, pipeline.max_seq_length
        model.forward(np.full((B, T), model.tokenizer.unk_token_id, dtype=np.int32),
                      attention_mask=np.ones((B, T), dtype=np.int32), token_type_ids=np.zeros((B, T), dtype=np.int32))
        pipeline.answer(["warm up?"], ["Warm-up context."])
        return model, pipeline

    async def shutdown(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        task = getattr(self, "_load_task", None)
        if task is not None and not task.done():
            task.cancel()
        self.cpu.shutdown(wait=False, cancel_futures=True)

    # ---- one request ---------------------------------------------------------------------------------------

    async def release_memory(self) -> None:
        """Give the C heap's free pages back to the system (after a large request, once it is answered)."""
        await asyncio.get_running_loop().run_in_executor(self.cpu, _trim_heap)

    async def answer(self, body: bytes, fmt: str, out_fmt: str, arrival: "_Arrival") -> tuple[bytes, str]:
        loop = asyncio.get_running_loop()
        try:
            parsed, prepared = await loop.run_in_executor(self.cpu, self._prepare, body, fmt)
        finally:
            arrival.done()  # from here on its windows are queued (below, with no await in between) or it failed
        input_ids, attention_mask, token_type_ids = prepared.model_inputs()
        try:
            start, end = await self.batcher.run(input_ids, attention_mask, token_type_ids)
        except QueueFull as e:
            raise RequestError(503, f"server busy: {e}; retry later", {"Retry-After": "1"}) from None
        return await loop.run_in_executor(self.cpu, self._finish, parsed, prepared, start, end, out_fmt)

    def _prepare(self, body: bytes, fmt: str):
        parsed = parse_request(body, fmt, self.config)
        questions = [q for r in parsed.records for q in r.questions]
        contexts = [r.context for r in parsed.records for _ in r.questions]
        if self.cheap_bound:
            check_windows_bound(parsed, self.pipeline.max_seq_length, self.pipeline.doc_stride,
                                self.config.max_windows)
        try:
            prepared = self.pipeline.prepare(questions, contexts, max_windows=self.config.max_windows)
        except TooMuchWork as e:
            raise RequestError(413, f"{e} (BERTQA_MAX_WINDOWS); send shorter contexts or fewer questions") from None
        return parsed, prepared

    def _finish(self, parsed: ParsedRequest, prepared, start, end, out_fmt: str) -> tuple[bytes, str]:
        answers, k = [], 0
        for r in parsed.records:
            for _ in r.questions:
                answers.append(self.pipeline.decode_one(prepared, k, start, end, r.top_k or 1, r.max_answer_length))
                k += 1
        return render_results(parsed, answers, out_fmt)


def _is_bert_wordpiece(tokenizer: Any) -> bool:
    """BERT's normalizer (or none), pre-tokenizer and WordPiece: what contract.min_tokens assumes."""
    tok = getattr(tokenizer, "tokenizer", None)
    try:
        names = (type(tok.normalizer).__name__, type(tok.pre_tokenizer).__name__, type(tok.model).__name__)
    except Exception:
        return False
    return names[0] in ("BertNormalizer", "NoneType") and names[1:] == ("BertPreTokenizer", "WordPiece")


class _Arrival:
    """Counts a request in service.on_the_way from its headers until its windows are queued (or it fails)."""

    def __init__(self, service: QAService):
        self.service = service
        self.active = True
        self.body_bytes = 0  # as much of the body as was declared or read
        service.on_the_way += 1

    def done(self) -> None:
        if self.active:
            self.active = False
            self.service.on_the_way -= 1
