"""The ASGI application (Starlette): the routes listed in bertqa.serve's docstring, request bodies read off the
wire within the payload limit, errors as JSON, and the page at / (index.html beside this file).

A client that disconnects has its queued windows dropped.
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
from .service import QAService, _Arrival
from .settings import CONFIG_ENV, ServeConfig

log = logging.getLogger("bertqa.serve")

INDEX_HTML = resources.files(__package__).joinpath("index.html").read_text(encoding="utf-8")


def _error(status: int, message: str, headers: Optional[dict] = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


async def _read_body(request, limit: int) -> bytes:
    """The body, at most limit bytes: RequestError 413 from Content-Length or while streaming."""
    declared = request.headers.get("content-length")
    too_big = (f"request body over the {limit / 1048576:g} MB limit (SAGEMAKER_MAX_PAYLOAD_IN_MB); split it "
               f"into several requests")
    if declared is not None:
        try:
            declared_n = int(declared)
        except ValueError:
            raise RequestError(400, f"invalid Content-Length {declared!r}") from None
        if declared_n > limit:
            await _drain(request, declared_n)
            raise RequestError(413, too_big + f" ({declared_n} bytes)", {"Connection": "close"})
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            await _drain(request, None)
            raise RequestError(413, too_big, {"Connection": "close"})
    return bytes(body)


async def _drain(request, declared: Optional[int], cap: int = 64 << 20) -> None:
    """Read and drop the rest of an over-limit body (up to cap bytes), so the client sees the 413 instead of a
    connection reset while it is still sending."""
    if declared is not None and declared > cap:
        return
    seen = 0
    with contextlib.suppress(Exception):
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > cap:
                return


async def _wait_disconnect(request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(config: Optional[ServeConfig] = None, model_loader: Optional[Callable[[], Any]] = None):
    """The Starlette application; model_loader() -> an object with BertQA's interface (default: load_model)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    config = config or ServeConfig.from_env()
    service = QAService(config, model_loader)

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
            return await _invocation(request, arrival)
        finally:
            arrival.done()

    async def _invocation(request: Request, arrival: _Arrival) -> Response:
        try:
            encoding = request.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise RequestError(415, f"unsupported Content-Encoding {encoding!r}: send the body uncompressed")
            fmt = request_format(request.headers.get("content-type"))
            out_fmt = response_format(request.headers.get("accept"), fmt)
            body = await _read_body(request, config.max_payload_bytes)
        except RequestError as e:
            return _error(e.status, e.message, e.headers)
        except ClientDisconnect:
            log.info("client disconnected while sending the request")
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
                log.info("client disconnected before its answer; its queued windows are dropped")
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
        body = {"loaded": service.loaded, "inflight_requests": service.inflight}
        if service.batcher is not None:
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
