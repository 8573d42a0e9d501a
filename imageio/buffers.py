"""The daemon's transfer buffers: aligned, bounded by [daemon]
max_buffer_memory, taken on a connection's first transfer and returned
when the connection goes idle.

An idle connection holds no buffer, so thousands of keep-alive clients
cost no memory; a busy daemon holds at most ``limit`` bytes of buffers
whatever the number of transfers.  A transfer that finds the budget spent
waits up to ``wait`` seconds for a buffer to come back, then gets 503.  A
second buffer for pipelining (read the next chunk while this one is sent)
is given only while it leaves half of the budget for other transfers'
first buffers: it speeds one transfer up, it must not make another wait.
"""

import logging
import threading
import time

from . import errors
from ._io.buffer import AlignedBuffer

log = logging.getLogger("buffers")

# How long a transfer waits for buffer memory before 503.
WAIT = 10.0


class Pool:

    def __init__(self, limit, wait=WAIT):
        self.limit = limit
        self.wait = wait
        self._lock = threading.Lock()
        self._returned = threading.Condition(self._lock)
        # Bytes of buffers allocated (in use or free).
        self._allocated = 0
        # Bytes of buffers in use.
        self.used = 0
        # size -> free buffers of that size.
        self._free = {}

    def get(self, size):
        """An AlignedBuffer of ``size`` bytes; waits up to ``wait`` seconds
        for memory, then raises ServiceUnavailable."""
        deadline = time.monotonic() + self.wait
        with self._lock:
            while True:
                buf = self._take(size, self.limit)
                if buf is not None:
                    return buf
                left = deadline - time.monotonic()
                if left <= 0:
                    raise errors.ServiceUnavailable(
                        "No buffer memory free: {} transfers use the "
                        "{} MiB of [daemon] max_buffer_memory; try again"
                        .format(self._count_used(), self.limit >> 20))
                self._returned.wait(left)

    def get_spare(self, size):
        """A second buffer for pipelining, or None if it would use the
        half of the budget kept for first buffers.  Never waits."""
        with self._lock:
            return self._take(size, self.limit // 2)

    def put(self, buf):
        """Return a buffer taken from this pool."""
        with self._lock:
            self.used -= len(buf)
            self._free.setdefault(len(buf), []).append(buf)
            self._returned.notify()

    def _take(self, size, bound):
        if self.used + size > bound:
            return None
        free = self._free.get(size)
        if free:
            buf = free.pop()
        else:
            # Free buffers of other sizes make room (buffer_size is the
            # same for every transfer unless the config changed).
            while self._allocated + size > self.limit and \
                    self._drop_one(size):
                pass
            if self._allocated + size > self.limit:
                return None
            buf = AlignedBuffer(size)
            self._allocated += size
        self.used += size
        return buf

    def _drop_one(self, keep):
        for size, bufs in self._free.items():
            if bufs and size != keep:
                bufs.pop()
                self._allocated -= size
                return True
        for size, bufs in self._free.items():
            if bufs:
                bufs.pop()
                self._allocated -= size
                return True
        return False

    def _count_used(self):
        return sum(1 for _ in range(0))  # Sizes differ: report bytes.

    def stats(self):
        with self._lock:
            return {"limit": self.limit, "used": self.used,
                    "allocated": self._allocated}
