"""Log lines that a client can cause, at a bounded rate.

A leaf module: the selector (imageio.connections) and the HTTP layer
(imageio.http) both log what unauthenticated clients provoke (refused
requests, accept failures, a thread limit), and a flood must not become a
flood of log lines.
"""

import collections
import logging
import threading
import time

# At most one line per kind and interval.
LOG_INTERVAL = 10.0


class RateLimitedLog:
    """Log a message at most once per ``interval`` per key, counting the
    ones left out and saying so in the next line of that key."""

    def __init__(self, logger, interval=LOG_INTERVAL, clock=time.monotonic):
        self._log = logger
        self._interval = interval
        self._clock = clock
        self._last = {}
        self._skipped = collections.Counter()
        self._lock = threading.Lock()

    def log(self, level, key, fmt, *args):
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._interval:
                self._skipped[key] += 1
                return
            self._last[key] = now
            skipped = self._skipped.pop(key, 0)
        if skipped:
            fmt += " (%d more since the last report)"
            args += (skipped,)
        self._log.log(level, fmt, *args)

    def warning(self, key, fmt, *args):
        self.log(logging.WARNING, key, fmt, *args)

    def info(self, key, fmt, *args):
        self.log(logging.INFO, key, fmt, *args)


def printable(text):
    """``text`` with control and other non-printable characters escaped
    (``\\n`` -> ``\\x0a``), so a client's bytes cannot forge a log line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable()
                   else "\\x{:02x}".format(ord(c)) if ord(c) < 0x100
                   else "\\u{:04x}".format(ord(c)) for c in text)
