"""OverloadLog: one log line per kind of overload per interval, instead of one (or a traceback) per connection."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

log = logging.getLogger("bertqa.serve")

OVERLOAD_LOG_INTERVAL_S = 10.0


class OverloadLog:
    """One log line per kind of overload per interval: the first event at once, later ones counted and logged as
    one line when the interval is over (a timer on the running loop, when there is one)."""

    def __init__(self, logger: logging.Logger = log, interval: float = OVERLOAD_LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic, level: int = logging.WARNING,
                 prefix: str = "overload: "):
        self.logger, self.interval, self.clock, self.level, self.prefix = logger, interval, clock, level, prefix
        self.kinds: dict[str, list] = {}  # kind -> [time of the last line, events since, message, flush scheduled]

    def note(self, kind: str, message: str) -> None:
        now = self.clock()
        state = self.kinds.get(kind)
        if state is None:
            self.logger.log(self.level, "%s%s (one line per %g s for this kind from now on)", self.prefix, message,
                            self.interval)
            self.kinds[kind] = [now, 0, message, False]
            return
        state[1] += 1
        state[2] = message
        if now - state[0] >= self.interval:
            self._flush(kind)
        elif not state[3]:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            state[3] = True
            loop.call_later(state[0] + self.interval - now, self._flush, kind)

    def _flush(self, kind: str) -> None:
        state = self.kinds[kind]
        state[3] = False
        if state[1]:
            now = self.clock()
            self.logger.log(self.level, "%s%d x %s in the last %.0f s", self.prefix, state[1], state[2],
                            now - state[0])
            state[0], state[1] = now, 0
