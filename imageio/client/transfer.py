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
from .. import extents as extents_
from .. import ops
from .._io import nbd as _nbd
from .._io.buffer import AlignedBuffer
from ..backends.base import IOFailed

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
    # An NBD error, or the local file's (client.direct: the daemon's file
    # backend), is an OSError: tell it apart from the HTTP side's
    # transport failures, which are retried.
    try:
        return fn(*args)
    except (_nbd.Error, IOFailed) as e:
        raise LocalError("Cannot {} the local image: {}".format(what, e))


def plan(extents, request_size=REQUEST_SIZE, skip_zero=False):
    """``iplan()`` as a list."""
    return list(iplan(extents, request_size, skip_zero))


def iplan(extents, request_size=REQUEST_SIZE, skip_zero=False):
    """Work items from ``(start, length, zero)`` extents: data extents
    split at multiples of ``request_size``; zero extents cut where they
    enter and leave a whole ``request_size`` window, the whole windows
    between as one item (dropped when ``skip_zero``).  Yields ``Item``s as
    ``extents`` (any iterable) comes; no item shares a window with an item
    of another task of ``tasks()``."""
    for start, length, zero in extents:
        end = start + length
        if zero:
            if skip_zero:
                continue
            head = min(end, -(-start // request_size) * request_size)
            tail = max(head, end - end % request_size)
            for a, b in ((start, head), (head, tail), (tail, end)):
                if b > a:
                    yield Item(a, b - a, True)
            continue
        pos = start
        while pos < end:
            stop = min(end, (pos // request_size + 1) * request_size)
            yield Item(pos, stop - pos, False)
            pos = stop


def tasks(items, request_size=REQUEST_SIZE):
    """Group ``plan()``'s items by window: the items of one
    ``request_size`` window are one task, done by one worker in order (so
    each hash block is fed in order); an item of whole windows is a task
    of its own.  Yields lists of ``Item`` as ``items`` (any iterable)
    comes."""
    task = []
    window = None
    for item in items:
        first = item.start // request_size
        last = (item.start + item.length - 1) // request_size
        if task and (first != last or first != window):
            yield task
            task = []
        task.append(item)
        window = first if first == last else None
    if task:
        yield task


# Adjacent (start, length, zero) extents with equal zero merged (a
# generator: each is yielded once the next one differs).
merged = extents_.merged


# Source extents are asked for this much of the image at a time, as the
# workers need them: the copy starts after the first piece, not after a
# walk of the whole image (0.63 s for a 1 TiB qcow2 holding 1 GiB).
EXTENTS_STEP = 1024**3


def source_extents(nbd, size, step=EXTENTS_STEP):
    """Yield ``(start, length, zero)`` of the NBD export ``nbd`` in pieces
    of ``step`` bytes; NBD errors are LocalError."""
    for batch in extents_.windows(
            lambda pos, n: _local("read the extents of", nbd.extents, pos,
                                  n, "zero"), 0, size, step):
        for e in batch:
            yield e.start, e.length, e.zero


class _Endpoints:
    """One worker's connections (NBD toward qemu-nbd, HTTP toward the
    daemon) and its buffer, allocated once; ``direct`` (an upload's
    ``client.direct.DirectSource``, a download's ``DirectTarget``, shared
    by the workers) reads or writes the local file itself where it covers
    an item."""

    def __init__(self, nbd, http, buffer_size, direct=None):
        self.nbd = nbd
        self.http = http
        self.buf = AlignedBuffer(buffer_size)
        self.direct = direct

    def close(self):
        self.nbd.close()
        self.http.close()


class Upload(_Endpoints):
    """An upload: NBD source, HTTP target."""

    def copy_data(self, item, tap=None):
        off, n = item.start, item.length
        src = self.nbd
        if self.direct is not None and self.direct.covers(off, n):
            src = self.direct
        self.http.put_with(
            off, n, lambda sink: _local("read", ops.read, src, sink, off,
                                        n, self.buf, None, tap))

    def zero(self, item):
        self.http.zero(item.start, item.length, True)


class Download(_Endpoints):
    """A download: HTTP source, NBD target."""

    def copy_data(self, item, tap=None):
        off, n = item.start, item.length
        dst = self.nbd
        if self.direct is not None and self.direct.covers(off, n):
            dst = self.direct
        self.http.get_with(
            off, n, lambda source: _local("write", ops.write, dst,
                                          source, off, n, self.buf, None,
                                          tap))

    def zero(self, item):
        _local("zero", self.nbd.zero, item.start, item.length, True)


def run(tasks, endpoints, progress=None, done=None, hasher=None,
        skip=None, moved=None, stop=None):
    """Copy ``tasks`` (lists of items, see ``tasks()``) with one thread
    per endpoint in ``endpoints`` (objects with ``copy_data``, ``zero``,
    ``close``); a task's items in order.  ``progress(n)`` is called with
    the bytes of each finished item, ``done(item)`` after it is confirmed
    written (by the worker, outside the workers' lock: it may block).
    Zero items for which ``skip(item)`` is true are not sent (their bytes
    count in ``progress`` at once).  ``tasks`` may be a
    generator: workers take the next task under a lock as they need it.
    ``hasher`` (a checksum.BlockHasher) is fed every item's bytes as they
    move, zero items (sent or skipped) as zeroes.  ``moved(item)`` is
    called (by the worker) after every item, skipped ones too: the
    windowed verification's clock.  The first failure stops all workers
    and is raised (after RETRIES for transport failures); setting
    ``stop`` (an Event) stops them too, without an error here."""
    lock = threading.Lock()
    queue = iter(tasks)
    failures = []
    if stop is None:
        stop = threading.Event()

    def next_item():
        with lock:
            if stop.is_set():
                return None
            return next(queue, None)

    def work(ep):
        try:
            while True:
                task = next_item()
                if task is None:
                    return
                for item in task:
                    if item.zero and skip is not None and skip(item):
                        if hasher is not None:
                            hasher.zero(item.start, item.length)
                        with lock:
                            if progress:
                                progress(item.length)
                        if moved:
                            moved(item)
                        continue
                    _with_retries(ep, item, stop, hasher)
                    with lock:
                        if progress:
                            progress(item.length)
                    # Outside the lock: done() may flush the target.
                    if done:
                        done(item)
                    if moved:
                        moved(item)
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


def _with_retries(ep, item, stop, hasher=None):
    tap = None if hasher is None else hasher.data
    for attempt in range(RETRIES + 1):
        mark = None if hasher is None else hasher.checkpoint(item.start)
        try:
            if item.zero:
                ep.zero(item)
                if hasher is not None:
                    hasher.zero(item.start, item.length)
            else:
                ep.copy_data(item, tap)
            return
        except errors.Error as e:
            if hasher is not None:
                hasher.restore(mark, item.start + item.length)
            if not e.retriable or attempt == RETRIES or \
                    stop.is_set():
                raise
            delay = RETRY_DELAY * 2**attempt
            log.warning("Request %d+%d failed (%s), retrying in %.1f s",
                        item.start, item.length, e, delay)
            time.sleep(delay)
