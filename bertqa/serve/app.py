"""The ASGI application (Starlette): the routes listed in bertqa.serve's docstring, request bodies read off the
wire within the payload limit, errors as JSON, and the page at / (index.html beside this file).

A client that disconnects has its queued windows dropped. A body must arrive within BERTQA_BODY_TIMEOUT of its
headers (408); one over SAGEMAKER_MAX_PAYLOAD_IN_MB is refused (413) from its Content-Length, or as soon as the bytes
read pass the limit, and is never held whole. After a body of TRIM_AFTER_BYTES or more the heap is trimmed once the
answer is sent. Disconnects are logged through an OverloadLog: one line per interval, not one per connection.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from importlib import resources
from typing import Any, Callable, Optional

from .contract import RequestError, request_format, response_format
from .openapi import openapi_spec
from .overload import OverloadLog
from .service import TRIM_AFTER_BYTES, QAService, _Arrival
from .settings import CONFIG_ENV, ServeConfig

log = logging.getLogger("bertqa.serve")

INDEX_HTML = resources.files(__package__).joinpath("index.html").read_text(encoding="utf-8")


def _error(status: int, message: str, headers: Optional[dict] = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


async def _read_body(request, limit: int, timeout: float, arrival: Optional["_Arrival"] = None) -> bytes:
    """The body, at most limit bytes, within timeout seconds of the call (the end of the headers): RequestError
    413 from Content-Length before reading, or as soon as the bytes read pass the limit; 408 past the time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    declared = request.headers.get("content-length")
    too_big = (f"request body over the {limit / 1048576:g} MB limit (SAGEMAKER_MAX_PAYLOAD_IN_MB); split it "
               f"into several requests")
    if declared is not None:
        try:
            declared_n = int(declared)
        except ValueError:
            raise RequestError(400, f"invalid Content-Length {declared!r}") from None
        if declared_n > limit:
            await _drain(request, declared_n, deadline)
            raise RequestError(413, too_big + f" ({declared_n} bytes)", {"Connection": "close"})
    body = bytearray()

    async def collect() -> bool:
        async for chunk in request.stream():
            body.extend(chunk)
            if arrival is not None:
                arrival.body_bytes = len(body)
            if len(body) > limit:
                return True
        return False

    try:
        over = await asyncio.wait_for(collect(), timeout)
    except asyncio.TimeoutError:
        raise RequestError(408, f"request body not received within {timeout:g} s of its headers "
                                f"(BERTQA_BODY_TIMEOUT)", {"Connection": "close"}) from None
    if over:
        del body[:]
        await _drain(request, None, deadline)
        raise RequestError(413, too_big, {"Connection": "close"})
    return bytes(body)


async def _drain(request, declared: Optional[int], deadline: float, cap: int = 64 << 20) -> None:
    """Read and drop the rest of an over-limit body (up to cap bytes, until the deadline), so the client sees
    the 413 instead of a connection reset while it is still sending."""
    remaining = deadline - asyncio.get_running_loop().time()
    if (declared is not None and declared > cap) or remaining <= 0:
        return

    async def consume() -> None:
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > cap:
                return

    with contextlib.suppress(Exception):
        await asyncio.wait_for(consume(), remaining)


async def _wait_disconnect(request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _declared_length(request) -> int:
    with contextlib.suppress(ValueError):
        return int(request.headers.get("content-length") or 0)
    return 0


def create_app(config: Optional[ServeConfig] = None, model_loader: Optional[Callable[[], Any]] = None):
    """The Starlette application; model_loader() -> an object with BertQA's interface (default: load_model)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    from starlette.background import BackgroundTask

    config = config or ServeConfig.from_env()
    service = QAService(config, model_loader)
    notes = OverloadLog(log, level=logging.INFO, prefix="")

    async def ping(request: Request) -> Response:
        if service.loaded:
            return Response(status_code=200)
        if service.load_error:
            return _error(503, f"model failed to load: {service.load_error}")
        return _error(503, "model is loading")

    async def invocations(request: Request) -> Response:
        if not service.loaded:
            return _error(503, f"model failed to load: {service.load_error}" if service.load_error
                          else "model is loading; retry when GET /ping answers 200", {"Retry-After": "5"})
        arrival = _Arrival(service)
        try:
            response = await _invocation(request, arrival)
        finally:
            arrival.done()
        if max(arrival.body_bytes, _declared_length(request)) >= TRIM_AFTER_BYTES:
            response.background = BackgroundTask(service.release_memory)
        return response

    async def _invocation(request: Request, arrival: _Arrival) -> Response:
        try:
            encoding = request.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise RequestError(415, f"unsupported Content-Encoding {encoding!r}: send the body uncompressed")
            fmt = request_format(request.headers.get("content-type"))
            out_fmt = response_format(request.headers.get("accept"), fmt)
            body = await _read_body(request, config.max_payload_bytes, config.body_timeout_s, arrival)
        except RequestError as e:
            return _error(e.status, e.message, e.headers)
        except ClientDisconnect:
            notes.note("disconnect sending", "client disconnected while sending the request")
            return Response(status_code=400)
        service.inflight += 1
        work = asyncio.ensure_future(service.answer(body, fmt, out_fmt, arrival))
        watch = asyncio.ensure_future(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({work, watch}, timeout=config.timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                content, media = work.result()
                return Response(content, media_type=media)
            work.cancel()
            if watch in done:
                notes.note("disconnect waiting", "client disconnected before its answer; its queued windows are "
                                                 "dropped")
                return Response(status_code=400)
            return _error(504, f"no answer within {config.timeout_s:g} s (SAGEMAKER_MODEL_SERVER_TIMEOUT); "
                               f"the server is overloaded or the request too large")
        except RequestError as e:
            return _error(e.status, e.message, e.headers)
        except Exception as e:
            log.exception("request failed")
            return _error(500, f"internal error: {type(e).__name__}: {e}")
        finally:
            service.inflight -= 1
            watch.cancel()
            if not work.done():
                work.cancel()

    async def execution_parameters(request: Request) -> Response:
        # Batch transform sends MULTI_RECORD requests (many lines each, enough to fill engine batches); two at a
        # time per worker keep its engine busy while the other one is being parsed or answered.
        return JSONResponse({
            "MaxConcurrentTransforms": 2 * config.workers,
            "BatchStrategy": "MULTI_RECORD",
            "MaxPayloadInMB": max(1, int(config.max_payload_mb)),
        })

    async def stats(request: Request) -> Response:
        body = {"loaded": service.loaded, "inflight_requests": service.inflight, "device": config.device}
        if service.batcher is not None:
            body["precision"] = service.precision
            body.update(service.batcher.stats())
            if config.device == "cpu":
                from .. import ops
                body["engine_threads"] = ops.runtime_info()["omp_threads"]
        return JSONResponse(body)

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_spec(config))

    async def index(request: Request) -> Response:
        return HTMLResponse(INDEX_HTML)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return _error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}"
                      + (" (routes: GET /ping, POST /invocations, GET /execution-parameters, GET /openapi.json)"
                         if exc.status_code == 404 else ""), getattr(exc, "headers", None))

    async def server_error(request: Request, exc: Exception) -> Response:
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.startup()
        if config.workers > 1:
            # Worker processes share one listening socket, and uvicorn accepts on it only once the lifespan
            # has started: a worker that waits here for its model takes no connection while loading, so a
            # client that saw /ping say 200 (from a loaded worker) never meets a loading one. (One worker
            # serves while it loads instead, so that /ping can answer 503 meanwhile, as SageMaker expects.)
            await asyncio.shield(service._load_task)
        try:
            yield
        finally:
            await service.shutdown()

    app = Starlette(
        routes=[
            Route("/ping", ping, methods=["GET"]),
            Route("/invocations", invocations, methods=["POST"]),
            Route("/execution-parameters", execution_parameters, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            Route("/stats", stats, methods=["GET"]),
            Route("/", index, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    app.state.service = service
    return app


def app_from_env():
    """Factory for worker processes (uvicorn --factory): the config travels in $BERTQA_SERVE_CONFIG."""
    raw = os.environ.get(CONFIG_ENV)
    return create_app(ServeConfig.from_json(raw) if raw else ServeConfig.from_env())
