"""Threads that run requests: their number follows the active requests,
never the connections (imageio.connections hands them work).  A thread
that cannot be started (RLIMIT_NPROC, the pids cgroup) is retried after a
growing back-off, logged at a bounded rate; an idle thread exits after
WORKER_IDLE seconds.
"""

import collections
import itertools
import logging
import threading
import time

log = logging.getLogger("connections")

# An idle worker thread exits after this many seconds.
WORKER_IDLE = 5

# Back-off of a failed thread start.
BACKOFF_MIN = 0.05
BACKOFF_MAX = 1.0

_ids = itertools.count(1)


class Workers:
    """Threads that run requests; their number follows the active
    requests, never the connections."""

    def __init__(self, name, ratelog):
        self._name = name
        self._ratelog = ratelog
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._tasks = collections.deque()
        self._idle = 0
        self._count = 0
        self._retry_at = 0.0
        self._backoff = BACKOFF_MIN
        self._stopped = False

    @property
    def count(self):
        return self._count

    def submit(self, func, *args):
        with self._lock:
            self._tasks.append((func, args))
            if self._idle > len(self._tasks) - 1:
                self._ready.notify()
                return
        self._grow()

    def pending(self):
        """Tasks waiting for a thread that could not be started; the
        selector calls ``retry`` once ``retry_at`` has passed."""
        with self._lock:
            return bool(self._tasks) and self._idle == 0

    @property
    def retry_at(self):
        return self._retry_at

    def retry(self):
        if self.pending() and time.monotonic() >= self._retry_at:
            self._grow()

    def _grow(self):
        with self._lock:
            self._count += 1
        try:
            threading.Thread(target=self._run, daemon=True,
                             name="{}/w{}".format(self._name,
                                                  next(_ids))).start()
        except RuntimeError as e:
            # Thread limit (RLIMIT_NPROC, the pids cgroup): the task waits
            # for a worker to free up, or for the retry after back-off.
            with self._lock:
                self._count -= 1
                self._retry_at = time.monotonic() + self._backoff
                self._backoff = min(self._backoff * 2, BACKOFF_MAX)
                count, waiting = self._count, len(self._tasks)
            self._ratelog.warning(
                "thread", "%s: cannot start a worker thread (%d running, "
                "%d requests waiting): %s", self._name, count, waiting, e)
        else:
            self._backoff = BACKOFF_MIN

    def _run(self):
        while True:
            with self._lock:
                while not self._tasks:
                    if self._stopped:
                        self._count -= 1
                        return
                    self._idle += 1
                    woke = self._ready.wait(WORKER_IDLE)
                    self._idle -= 1
                    if not woke and not self._tasks:
                        self._count -= 1
                        return
                func, args = self._tasks.popleft()
            try:
                func(*args)
            except Exception:
                log.exception("%s: worker task failed", self._name)

    def stop(self):
        with self._lock:
            self._stopped = True
            self._ready.notify_all()
