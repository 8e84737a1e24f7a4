"""Connection limits below the application: uvicorn's h11 protocol with time limits, a bound on open connections
and rate-limited overload logging (GuardedH11Protocol, given to uvicorn as `http=`).

What uvicorn 0.2x-0.5x enforces by itself, read from uvicorn/protocols/http/h11_impl.py: `timeout_keep_alive` is
armed only after a response, and any byte cancels it, so a connection that sends part of a request line or of its
headers and waits is kept forever, and so is a fresh connection that sends nothing; `h11_max_incomplete_event_size`
(16 KB) bounds the size of the headers, not the time they take; `limit_concurrency` answers 503 to every request
once connections + tasks reach it (GET /ping included) and closes nothing. What this module adds, per connection:

    idle (fresh, or between requests)   closed after keep_alive_s (BERTQA_KEEP_ALIVE_TIMEOUT, 75)
    first byte -> end of the headers    header_timeout_s (BERTQA_HEADER_TIMEOUT, 10): 408, closed. Counted from the
                                        first byte, not reset by later ones: a client that sends a byte every few
                                        seconds (slowloris) is closed all the same
    end of headers -> end of the body   body_timeout_s (BERTQA_BODY_TIMEOUT, 30): the application answers 408 and
                                        closes (app.py); this layer closes the connection a few seconds later if
                                        the body is still incomplete (a route that does not read its body)
    request complete -> answer          the application's timeout_s (SAGEMAKER_MODEL_SERVER_TIMEOUT, 60): 504

SageMaker's front end gives an invocation 60 s in all and sends requests from inside AWS whole and at once: its
headers and bodies take milliseconds, so these limits only cut off clients that are not SageMaker (a container run
by hand, a hostile peer) and that SageMaker would have given up on anyway.

A bound on open connections keeps GET /ping answering (SageMaker replaces an instance whose /ping fails): past
max_connections a new connection closes the oldest idle one, else the oldest still sending its headers, else the
oldest still sending its body; connections whose request is complete are never closed, and when all are such the
new one is closed. The bound stays below the open-files limit, because past it accept() fails with EMFILE and
Python's asyncio (3.11 at least) then logs a traceback and schedules a retry for each of up to `backlog` accept
attempts per pass of the loop, which fills the log. The loop accepts up to `backlog` connections in one pass before
any of them is counted here, so the reserve is 64 descriptors for the process itself plus 3 * backlog.

Overload (connections closed at the bound or at a time limit, uvicorn's "Invalid HTTP request received.", accept()
errors) is logged as one line per kind, then at most one line per kind every 10 s with the count (overload.py).

This module imports uvicorn: run_server imports it when it starts a server, so `import bertqa.serve` stays light.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
from typing import Any, Optional

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .overload import OverloadLog
from .settings import CONFIG_ENV, ServeConfig

log = logging.getLogger("bertqa.serve")

PROCESS_RESERVE_FDS = 64  # model files, pipes, eventfds of the thread pools, the listening socket, stdio
MAX_CONNECTIONS_DEFAULT_CAP = 1024
BODY_GRACE_S = 5.0  # after body_timeout_s: the application answers 408 first; this layer closes a body left unread


class _RateLimitedLogger:
    """uvicorn's "uvicorn.error" logger with warnings (one per bad connection) going through an OverloadLog."""

    def __init__(self, logger: logging.Logger, overload: OverloadLog):
        self._logger, self._overload = logger, overload

    def warning(self, msg: str, *args: Any, **kwargs: Any) -> None:
        text = msg % args if args else msg
        self._overload.note("uvicorn: " + text, f"uvicorn: {text}")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger, name)


def open_files_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else int(soft)


def connection_limits(config: ServeConfig, nofile: Optional[int] = None) -> tuple[int, int]:
    """(max_connections, backlog) per worker: the configured values, else derived from the soft open-files limit."""
    nofile = open_files_limit() if nofile is None else nofile
    backlog = config.backlog or min(2048, max(16, nofile // 16))
    auto = min(MAX_CONNECTIONS_DEFAULT_CAP, nofile - PROCESS_RESERVE_FDS - 3 * backlog)
    return config.max_connections or max(8, auto), backlog


class ConnectionGuard:
    """The open connections of one server (one uvicorn Config) in the order they were opened, and its limits."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.nofile = open_files_limit()
        self.max_connections, self.backlog = connection_limits(config, self.nofile)
        self.open: dict["GuardedH11Protocol", None] = {}
        self.overload = OverloadLog()
        self._loop_handler_set = False
        need = self.max_connections + PROCESS_RESERVE_FDS + 3 * self.backlog
        if need > self.nofile:
            log.warning("max_connections %d with backlog %d may need %d file descriptors; the open-files limit "
                        "(ulimit -n) is %d: raise it or lower BERTQA_MAX_CONNECTIONS / BERTQA_BACKLOG",
                        self.max_connections, self.backlog, need, self.nofile)

    @classmethod
    def of(cls, uv_config: Any) -> "ConnectionGuard":
        """The guard of a uvicorn Config: set by run_server, else (worker processes) made from $BERTQA_SERVE_CONFIG."""
        guard = getattr(uv_config, "bertqa_guard", None)
        if guard is None:
            raw = os.environ.get(CONFIG_ENV)
            guard = cls(ServeConfig.from_json(raw) if raw else ServeConfig.from_env())
            uv_config.bertqa_guard = guard
        return guard

    def admit(self, conn: "GuardedH11Protocol") -> bool:
        """Count a new connection; past the bound close the oldest closable one, or refuse this one (False)."""
        if not self._loop_handler_set:
            self._loop_handler_set = True
            self._catch_accept_errors(conn.loop)
        if len(self.open) >= self.max_connections:
            victim = self._victim()
            if victim is None:
                self.overload.note("refused", f"closed new connections: all {self.max_connections} open connections "
                                              f"have requests in progress (BERTQA_MAX_CONNECTIONS)")
                return False
            phase = victim.phase
            self.overload.note(f"evicted {phase}", f"closed the oldest {_PHASE_TEXT[phase]} to stay within "
                                                   f"{self.max_connections} open connections (BERTQA_MAX_CONNECTIONS)")
            victim.close()
        self.open[conn] = None
        return True

    def _victim(self) -> Optional["GuardedH11Protocol"]:
        first: dict[str, GuardedH11Protocol] = {}
        for conn in self.open:
            if conn.phase not in first:
                first[conn.phase] = conn
                if conn.phase == "idle":
                    break
        for phase in ("idle", "head", "body"):
            if phase in first:
                return first[phase]
        return None

    def _catch_accept_errors(self, loop: asyncio.AbstractEventLoop) -> None:
        """accept() errors (EMFILE should not happen within the bound, but another part of the process may hold
        descriptors) as overload lines instead of one traceback per attempt."""
        previous = loop.get_exception_handler()

        def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
            message = str(context.get("message", ""))
            if message.startswith("socket.accept() out of system resource"):
                exc = context.get("exception")
                self.overload.note("accept", f"accept() failed: {exc} (open-files limit {self.nofile})")
            elif previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handler)


_PHASE_TEXT = {"idle": "idle connection", "head": "connection still sending its headers",
               "body": "connection still sending its body"}


def _timeout_response(message: str) -> bytes:
    body = json.dumps({"error": message, "status": 408}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body))


class GuardedH11Protocol(H11Protocol):
    """uvicorn's H11Protocol with the time limits and the connection bound of the module docstring.

    phase: "idle" (no byte of a request yet), "head" (part of the request line or headers), "body" (headers done,
    body incomplete), "busy" (request complete: the application has it).
    """

    def __init__(self, config: Any, server_state: Any, app_state: dict, _loop: Any = None):
        super().__init__(config, server_state, app_state, _loop)
        self.guard = ConnectionGuard.of(config)
        self.logger = _RateLimitedLogger(self.logger, self.guard.overload)  # type: ignore[assignment]
        self.phase = "idle"
        self._seen_cycle: Any = None
        self._deadline: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.guard.admit(self):
            transport.close()
            return
        self._arm_keep_alive()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.guard.open.pop(self, None)
        self._cancel_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._sync()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._sync()

    def close(self) -> None:
        self.guard.open.pop(self, None)  # no longer counted: the descriptor goes on the loop's next pass
        self._cancel_deadline()
        self._unset_keepalive_if_required()
        if not self.transport.is_closing():
            self.transport.close()

    # ---- phases and deadlines ------------------------------------------------------------------------------

    def _sync(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        cycle = self.cycle
        new_request = cycle is not None and cycle is not self._seen_cycle
        if new_request:
            self._seen_cycle = cycle
        if cycle is not None and not cycle.response_complete:
            phase = "body" if cycle.more_body else "busy"
        elif cycle is not None and self.conn.their_state is h11.SEND_BODY:
            phase = "body"  # answered before its body was read (a 404, a 413): the rest is still coming
        elif self.conn.trailing_data[0]:
            phase = "head"
        else:
            phase = "idle"
        if phase == self.phase and not (new_request and phase == "body"):
            return
        self.phase = phase
        self._cancel_deadline()
        if phase == "head":
            self._deadline = self.loop.call_later(self.guard.config.header_timeout_s, self._header_timeout)
        elif phase == "body":
            self._deadline = self.loop.call_later(self.guard.config.body_timeout_s + BODY_GRACE_S, self._body_timeout)
        elif phase == "idle":
            self._arm_keep_alive()

    def _arm_keep_alive(self) -> None:
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _header_timeout(self) -> None:
        self._deadline = None
        if self.phase != "head" or self.transport.is_closing():
            return
        limit = self.guard.config.header_timeout_s
        self.guard.overload.note("header timeout", f"closed connections whose request headers were not complete "
                                                   f"{limit:g} s after their first byte (BERTQA_HEADER_TIMEOUT)")
        self.transport.write(_timeout_response(f"request headers not received within {limit:g} s "
                                               f"(BERTQA_HEADER_TIMEOUT)"))
        self.close()

    def _body_timeout(self) -> None:
        self._deadline = None
        if self.phase != "body" or self.transport.is_closing():
            return
        limit = self.guard.config.body_timeout_s
        self.guard.overload.note("body timeout", f"closed connections whose request body was not complete "
                                                 f"{limit + BODY_GRACE_S:g} s after its headers (BERTQA_BODY_TIMEOUT)")
        self.close()
