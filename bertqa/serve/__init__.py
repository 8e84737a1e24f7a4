"""A SageMaker-compatible question-answering endpoint with dynamic batching (uvicorn + Starlette).

    bertqa serve --model-dir /opt/ml/model          # a model folder or a model.tar.gz; python -m bertqa.serve too
    curl -s localhost:8080/invocations -H 'Content-Type: application/json' \\
         -d '{"question": "Where is the tower?", "context": "The tower is in Paris."}'
    # {"answer": "Paris", "score": 0.97, "start": 16, "end": 21}       context[start:end] == answer

Routes (the SageMaker inference contract, plus a description and a page):
    GET  /ping                   200 with an empty body once the model is loaded; 503 (JSON) before (with
                                 several workers, a worker accepts connections only once its model is loaded)
    POST /invocations            answers; application/json or application/jsonlines
    GET  /execution-parameters   MaxConcurrentTransforms, BatchStrategy, MaxPayloadInMB for batch transform
    GET  /openapi.json           OpenAPI 3.1 description of these routes
    GET  /stats                  the engine's device and precision, batching statistics (engine calls, windows,
                                 batch sizes)
    GET  /                       a small page to ask a question in a browser

One file per concern; each docstring says the details:
    settings.py   ServeConfig: defaults, environment variables (SAGEMAKER_*, BERTQA_*), validation
    contract.py   /invocations bodies, content types, parsing and validation, error statuses, rendering answers
    batcher.py    DynamicBatcher: concurrent requests' windows gathered into engine calls
    service.py    QAService: the model of one server process, loaded, warmed up, answering one request
    app.py        the Starlette application and its routes; index.html beside it is the page at /
    connections.py  below the application: time limits on headers, bodies and idle connections, the bound on open
                  connections (GuardedH11Protocol, given to uvicorn)
    overload.py   OverloadLog: one log line per kind of overload per interval
    openapi.py    the OpenAPI document
    runner.py     run_server: one worker in this process or uvicorn worker processes, until SIGTERM/SIGINT
    cli.py        the `bertqa serve` flags and `python -m bertqa.serve`
"""
from .app import INDEX_HTML, app_from_env, create_app
from .batcher import CALL_OVERHEAD_TOKENS, FILL_TOKENS, DynamicBatcher, QueueFull
from .cli import add_serve_flags, add_serve_parser, main, serve_command
from .contract import (JSON_TYPES, JSONL_TYPES, ParsedRequest, Record, RequestError, decode_utf8, media_type,
                       parse_record, parse_request, render_results, request_format, response_format)
from .openapi import openapi_spec
from .runner import run_server
from .service import QAService, load_model
from .settings import CONFIG_ENV, ServeConfig

__all__ = [
    "ServeConfig", "CONFIG_ENV",
    "RequestError", "Record", "ParsedRequest", "JSON_TYPES", "JSONL_TYPES", "media_type", "request_format",
    "response_format", "decode_utf8", "parse_record", "parse_request", "render_results",
    "DynamicBatcher", "QueueFull", "CALL_OVERHEAD_TOKENS", "FILL_TOKENS",
    "QAService", "load_model",
    "create_app", "app_from_env", "INDEX_HTML", "openapi_spec",
    "run_server", "add_serve_parser", "add_serve_flags", "serve_command", "main",
]
