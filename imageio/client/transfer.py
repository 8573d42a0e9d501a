"""The extents-driven copy, as nbdcopy plans it.

The source's extents are split into work items: data items of at most
``request_size`` bytes, read from one side and sent to the other; zero
items become one zero request (or nothing when the target already reads
as zero).  Several workers take items in order, each with its own
connections (``backend.clone()``) and its own buffer, allocated once.  No
byte moves here: a data item is one HTTP request whose body the copy
engine (``imageio.ops``, the daemon's) moves between the NBD backend and
the request's socket, in C (``imageio._io.nbd``) with the GIL released
when the socket is plain.
"""

import collections
import logging
import threading
import time

from .. import errors
from .. import ops
from .._io import nbd as _nbd
from .._io.buffer import AlignedBuffer

log = logging.getLogger("client.transfer")

# Bytes per data request: large enough that a request head costs nothing,
# small enough that 4 workers keep both sides busy.
REQUEST_SIZE = 8 * 1024**2

# A request that failed in transport is sent again this many times, after
# RETRY_DELAY, 2 * RETRY_DELAY, ... seconds.
RETRIES = 3
RETRY_DELAY = 0.5

Item = collections.namedtuple("Item", "start length zero")


class LocalError(errors.Error):
    """The local image (the private qemu-nbd) failed: not retried."""


def _local(what, fn, *args):
    # An NBD error is an OSError: tell it apart from the HTTP side's
    # transport failures, which are retried.
    try:
        return fn(*args)
    except _nbd.Error as e:
        raise LocalError("Cannot {} the local image: {}".format(what, e))


def plan(extents, request_size=REQUEST_SIZE, skip_zero=False):
    """Work items from ``(start, length, zero)`` extents: data extents
    split at multiples of ``request_size``, zero extents whole (dropped when
    ``skip_zero``).  Returns a list of ``Item``."""
    items = []
    for start, length, zero in extents:
        if zero:
            if not skip_zero:
                items.append(Item(start, length, True))
            continue
        end = start + length
        pos = start
        while pos < end:
            stop = min(end, (pos // request_size + 1) * request_size)
            items.append(Item(pos, stop - pos, False))
            pos = stop
    return items


def merged(extents):
    """Merge adjacent ``(start, length, zero)`` extents with equal zero."""
    out = []
    for start, length, zero in extents:
        if out and out[-1][2] == zero and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length, zero)
        else:
            out.append((start, length, zero))
    return out


class _Endpoints:
    """One worker's connections (NBD toward qemu-nbd, HTTP toward the
    daemon) and its buffer, allocated once."""

    def __init__(self, nbd, http, buffer_size):
        self.nbd = nbd
        self.http = http
        self.buf = AlignedBuffer(buffer_size)

    def close(self):
        self.nbd.close()
        self.http.close()


class Upload(_Endpoints):
    """An upload: NBD source, HTTP target."""

    def copy_data(self, item):
        off, n = item.start, item.length
        self.http.put_with(
            off, n, lambda sink: _local("read", ops.read, self.nbd, sink, off,
                                        n, self.buf))

    def zero(self, item):
        self.http.zero(item.start, item.length, True)


class Download(_Endpoints):
    """A download: HTTP source, NBD target."""

    def copy_data(self, item):
        off, n = item.start, item.length
        self.http.get_with(
            off, n, lambda source: _local("write", ops.write, self.nbd,
                                          source, off, n, self.buf))

    def zero(self, item):
        _local("zero", self.nbd.zero, item.start, item.length, True)


def run(items, endpoints, progress=None, done=None):
    """Copy ``items`` with one thread per endpoint in ``endpoints``
    (objects with ``copy_data``, ``zero``, ``close``).  ``progress(n)`` is
    called with the bytes of each finished item, ``done(item)`` after it is
    confirmed written.  The first failure stops all workers and is raised
    (after RETRIES for transport failures)."""
    lock = threading.Lock()
    queue = iter(items)
    failures = []
    stop = threading.Event()

    def next_item():
        with lock:
            if stop.is_set():
                return None
            return next(queue, None)

    def work(ep):
        try:
            while True:
                item = next_item()
                if item is None:
                    return
                _with_retries(ep, item, stop)
                with lock:
                    if progress:
                        progress(item.length)
                    if done:
                        done(item)
        except BaseException as e:
            failures.append(e)
            stop.set()

    threads = [threading.Thread(target=work, args=(ep,), daemon=True,
                                name="copy-{}".format(i))
               for i, ep in enumerate(endpoints)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    finally:
        stop.set()
        for t in threads:
            t.join()
    if failures:
        raise failures[0]


def _with_retries(ep, item, stop):
    op = ep.zero if item.zero else ep.copy_data
    for attempt in range(RETRIES + 1):
        try:
            op(item)
            return
        except errors.Error as e:
            if not getattr(e, "retriable", False) or attempt == RETRIES or \
                    stop.is_set():
                raise
            delay = RETRY_DELAY * 2**attempt
            log.warning("Request %d+%d failed (%s), retrying in %.1f s",
                        item.start, item.length, e, delay)
            time.sleep(delay)
