"""Running the endpoint in this process (one worker) or in uvicorn worker processes, until SIGTERM/SIGINT."""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, Optional

from .app import create_app
from .settings import CONFIG_ENV, ServeConfig


def run_server(config: ServeConfig, model_loader: Optional[Callable[[], Any]] = None, sockets=None) -> int:
    """Serve until SIGTERM/SIGINT; 0 after a clean shutdown, 1 when the model could not be loaded.

    One worker runs in this process. Several (SAGEMAKER_MODEL_SERVER_WORKERS) are uvicorn worker processes, each
    loading its own model (an archive is unpacked by each, and removed once loaded). After SIGTERM/SIGINT uvicorn
    finishes the requests in flight, then re-raises the signal, so the process ends with the signal's status
    (143 for SIGTERM), as a container's main process conventionally does.
    """
    import uvicorn

    from .connections import ConnectionGuard, GuardedH11Protocol, connection_limits

    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _, backlog = connection_limits(config)
    common = dict(host=config.host, port=config.port, log_level=config.log_level, access_log=config.access_log,
                  lifespan="on", timeout_graceful_shutdown=int(math.ceil(config.timeout_s)) + 5,
                  # Idle keep-alive connections are kept 75 s by default (nginx's), so pooling clients reuse them;
                  # the header and body time limits and the connection bound live in the protocol (connections.py).
                  timeout_keep_alive=config.keep_alive_s, http=GuardedH11Protocol, backlog=backlog)
    if config.workers > 1:
        if model_loader is not None:
            raise ValueError("a custom model_loader needs workers=1 (worker processes load the model themselves)")
        os.environ[CONFIG_ENV] = config.to_json()
        uvicorn.run("bertqa.serve.app:app_from_env", factory=True, workers=config.workers, **common)
        return 0
    app = create_app(config, model_loader)
    uv_config = uvicorn.Config(app, **common)
    uv_config.bertqa_guard = ConnectionGuard(config)
    server = uvicorn.Server(uv_config)
    service = app.state.service

    def stop_on_load_error():
        server.should_exit = True

    service.on_load_error = stop_on_load_error
    server.run(sockets=sockets)
    return 1 if service.load_error else 0
