"""The daemon's transfer buffers: aligned, bounded by [daemon]
max_buffer_memory, taken on a connection's first transfer and returned
when the connection goes idle.

An idle connection holds no buffer, so thousands of keep-alive clients
cost no memory; a busy daemon holds at most ``limit`` bytes of buffers
whatever the number of transfers.  Under pressure buffers get smaller
(see SHARE); a transfer that finds the budget spent waits up to ``wait``
seconds for a buffer to come back, then gets 503.  A transfer needs no
second buffer to overlap reads and writes: the copy engine (imageio.ops)
uses the halves of this one.
"""

import logging
import threading
import time

from . import errors
from ._io.buffer import AlignedBuffer

log = logging.getLogger("buffers")

# How long a transfer waits for buffer memory before 503.
WAIT = 10.0

# Under memory pressure a transfer gets a smaller buffer (halved down to
# this size) rather than waiting: a full buffer while the free budget is
# at least SHARE times its size.  With the defaults (768 MiB, 8 MiB) 64
# transfers get 8 MiB, the next ones 4, 2, then 1 MiB: about 190 transfers
# run at once before any waits, where 8 MiB each would allow 96.  Chunks
# of 1 MiB cost little: at that concurrency the CPU, not the syscall
# count, is the limit.
MIN_SIZE = 1024**2
SHARE = 32


class Pool:
    """Buffers of at most ``limit`` bytes in all (in use or kept free for
    reuse)."""

    def __init__(self, limit, wait=WAIT):
        self.limit = limit
        self.wait = wait
        self._lock = threading.Lock()
        self._returned = threading.Condition(self._lock)
        # Bytes of buffers allocated (in use or free), and in use.
        self._allocated = 0
        self._used = 0
        # size -> free buffers of that size.
        self._free = {}
        # id() of the buffers leased.
        self._leases = set()

    def get(self, size):
        """An AlignedBuffer of ``size`` bytes; waits up to ``wait`` seconds
        for memory, then raises ServiceUnavailable.  Give it back with
        ``release``."""
        deadline = time.monotonic() + self.wait
        with self._lock:
            while True:
                buf = self._take(self._grant(size), self.limit)
                if buf is not None:
                    self._leases.add(id(buf))
                    return buf
                left = deadline - time.monotonic()
                if left <= 0:
                    raise errors.ServiceUnavailable(
                        "No transfer buffer free: {} MiB of {} MiB "
                        "([daemon] max_buffer_memory) in use by other "
                        "transfers; try again".format(
                            self._used >> 20, self.limit >> 20))
                self._returned.wait(left)

    def _grant(self, size):
        room = self.limit - self._used
        while size > MIN_SIZE and size * SHARE > room:
            size //= 2
        return size

    def reserve(self, nbytes):
        """Count ``nbytes`` of memory allocated elsewhere (a decoder's
        window, a scratch bytearray) against the limit, waiting like
        ``get``; give it back with ``unreserve``."""
        deadline = time.monotonic() + self.wait
        with self._lock:
            while True:
                if self._used + nbytes <= self.limit:
                    while self._allocated + nbytes > self.limit \
                            and self._drop_free():
                        pass
                    if self._allocated + nbytes <= self.limit:
                        self._used += nbytes
                        self._allocated += nbytes
                        return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise errors.ServiceUnavailable(
                        "No transfer memory free: {} MiB of {} MiB "
                        "([daemon] max_buffer_memory) in use by other "
                        "transfers; try again".format(
                            self._used >> 20, self.limit >> 20))
                self._returned.wait(left)

    def unreserve(self, nbytes):
        with self._lock:
            self._used -= nbytes
            self._allocated -= nbytes
            self._returned.notify_all()

    def release(self, buf):
        """Return ``buf`` to the pool."""
        with self._lock:
            self._leases.remove(id(buf))
            self._used -= len(buf)
            self._free.setdefault(len(buf), []).append(buf)
            self._returned.notify_all()

    def _take(self, size, bound):
        if self._used + size > bound:
            return None
        free = self._free.get(size)
        if free:
            buf = free.pop()
        else:
            # Free buffers of other sizes make room (buffer_size changes
            # only with the configuration, but tests vary it).
            while self._allocated + size > self.limit and self._drop_free():
                pass
            if self._allocated + size > self.limit:
                return None
            buf = AlignedBuffer(size)
            self._allocated += size
        self._used += size
        return buf

    def _drop_free(self):
        for size, bufs in self._free.items():
            if bufs:
                bufs.pop()
                self._allocated -= size
                return True
        return False

    def stats(self):
        """Bytes: ``limit``, ``used`` by transfers, ``allocated`` (used or
        kept for reuse)."""
        with self._lock:
            return {"limit": self.limit, "used": self._used,
                    "allocated": self._allocated}


_pools = {}
_pools_lock = threading.Lock()


def pool(cfg):
    """The daemon's pool (one per configuration object)."""
    with _pools_lock:
        p = _pools.get(id(cfg))
        if p is None:
            p = _pools[id(cfg)] = Pool(cfg.daemon.max_buffer_memory)
        return p

