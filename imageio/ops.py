"""The copy engine: every transfer of image bytes, written once.

Like nbdcopy's ``multi-thread-copying.c`` over ``struct rw_ops``: the
engine splits a range into chunks, overlaps reading chunk i+1 with writing
chunk i where a side waits for a disk or a peer, reports progress after
each chunk (the caller's progress raises to cancel) and never asks which
kind of backend it holds.  Backends keep primitives (``readinto``,
``write``, ``zero``, ``flush``, ``extents``; see ``imageio.backends``) and
their C fast paths to and from a plain socket (``send_to``, ``recv_from``).

The calls (``buf`` is the caller's ``AlignedBuffer``; ``progress(n)`` is
called with the bytes of each chunk once it reached the destination, and an
exception it raises, such as ``errors.Canceled``, stops the transfer there):

``read(backend, sink, offset, length, buf, progress=None, tap=None)``
    The image's bytes ``[offset, offset + length)`` to a ``Sink`` (a GET's
    response).
``write(backend, source, offset, length, buf, progress=None, tap=None)``
    Exactly ``length`` bytes of a ``Source`` (a PUT's body) to the image at
    ``offset``; ``errors.PartialContent`` when the source ends early (what
    arrived is written).  Does not flush.
``copy(src, dst, offset, length, buf, progress=None)``
    Between two backends: a client's planner calls it per extent, e.g. NBD
    -> HTTP for an upload, HTTP -> NBD for a download.  Several workers may
    copy at once, each with its own backends (``clone()``) and buffer: the
    engine's helper thread belongs to the calling thread.
``zero(backend, offset, length, punch_hole, progress=None)``
    Make the range read as zeroes, in steps reported like chunks.

``tap(offset, view)``, when given to ``read`` or ``write``, sees every
chunk's bytes in order before they go to the destination (the client
hashes what it moves); the bytes then pass through the buffer, never a
fast path that skips it.

An error on either side propagates to the caller after the other side's
chunk in flight has finished: the buffer is never handed back while a
helper still fills it.
"""

import concurrent.futures
import threading

from . import errors
from ._io import stream

# Chunks after the first start at multiples of this: O_DIRECT storage then
# reads and writes them without a bounce buffer.
ALIGN = 4096

# A zero request is done in steps of this size, checking for cancel
# between them: fallocate or NBD WRITE_ZEROES of 1 GiB takes milliseconds
# to a few seconds even on slow storage.
ZERO_STEP = 1024**3

_local = threading.local()


def read(backend, sink, offset, length, buf, progress=None, tap=None):
    """Send ``length`` bytes of ``backend`` at ``offset`` to ``sink``."""
    with _operation(backend, "read", length) as backend:
        _read(backend, sink, offset, length, buf,
              _reporter("read", progress), tap)


def write(backend, source, offset, length, buf, progress=None, tap=None):
    """Write exactly ``length`` bytes from ``source`` at ``offset``."""
    with _operation(backend, "write", length) as backend:
        _write(backend, source, offset, length, buf,
               _reporter("write", progress), tap)


def copy(src, dst, offset, length, buf, progress=None):
    """Copy ``length`` bytes at ``offset`` from backend ``src`` to backend
    ``dst`` (same offset on both)."""
    report = _reporter("copy", progress)
    with _operation(src, "read", length) as src, \
            _operation(dst, "write", length) as dst:
        if dst.writer is not None:
            with dst.writer(offset, length) as sink:
                _read(src, sink, offset, length, buf, report)
            return
        if src.reader is not None:
            with src.reader(offset, length) as source:
                _write(dst, source, offset, length, buf, report)
            return
        _pump(_Image(src), _Image(dst), offset, length, buf, report,
              src.overlap or dst.overlap)


def zero(backend, offset, length, punch_hole, progress=None):
    """Make ``length`` bytes at ``offset`` read as zeroes, in steps of
    ZERO_STEP: progress between them stops a zero of a huge range."""
    report = _reporter("zero", progress)
    end = offset + length
    with _operation(backend, "zero", length) as backend:
        while offset < end:
            n = min(ZERO_STEP, end - offset)
            backend.zero(offset, n, punch_hole)
            offset += n
            report(n)


def _operation(backend, op, length):
    """One engine call as one operation of ``backend``: yields the backend
    the bytes move with (a wrapper that counts operations,
    metrics.Metered, counts it there)."""
    return backend.operation(op, length)


def _reporter(op, progress):
    """The one place that learns how many bytes each chunk of an operation
    moved (``op``: "read", "write", "copy", "zero"): per-chunk counters
    belong here; per-operation ones are ``metrics.Metered.operation``."""
    def report(n):
        if progress is not None:
            progress(n)
    return report


def _read(backend, sink, offset, length, buf, report, tap=None):
    if backend.send_to is not None and sink.fd >= 0:
        # Plain socket: the backend's C loop (sendfile, libnbd requests in
        # flight) sends the whole range and reports about once per buffer.
        if tap is None:
            backend.send_to(sink.fd, offset, length, buf, sink.timeout,
                            report)
            return
        if backend.taps_sent:
            # It reads each chunk into buf for tap, and sends it without
            # a copy (the client's source file: client.direct).
            backend.send_to(sink.fd, offset, length, buf, sink.timeout,
                            report, tap)
            return
    dst = _tapped(_Out(sink), tap)
    if backend.reader is not None:
        # A range that comes as one stream (the proxy's GET).
        with backend.reader(offset, length) as source:
            _pump(_In(source), dst, offset, length, buf, report,
                  backend.overlap)
    else:
        _pump(_Image(backend), dst, offset, length, buf, report,
              backend.overlap)


def _write(backend, source, offset, length, buf, report, tap=None):
    if backend.writer is not None:
        # A range that goes as one stream (the proxy's PUT).
        with backend.writer(offset, length) as sink:
            _pump(_In(source), _tapped(_Out(sink), tap), offset, length,
                  buf, report, backend.overlap)
        return
    recv_from = backend.recv_from
    dst = _tapped(_Image(backend), tap)
    if recv_from is None or tap is not None:
        _pump(_In(source), dst, offset, length, buf, report, backend.overlap)
        return
    done = 0
    if source.fd < 0:
        # TLS, or bytes the HTTP reader buffered: through Python until the
        # socket itself holds the rest of the body.
        done = _pump(_In(source, stop_at_fd=True), dst, offset, length, buf,
                     report, backend.overlap)
    if done < length:
        # Plain socket: the backend's C loop receives and writes the rest.
        got = recv_from(source.fd, offset + done, length - done, buf,
                        source.timeout, report)
        source.consumed(got)
        if got < length - done:
            raise errors.PartialContent(length, done + got)


# Endpoints: one side of a transfer, moving one chunk at a time.  read()
# returns a view holding the chunk (shorter only when a stream ended);
# write() takes it.

class _Image:
    """A backend, addressed by offset."""

    __slots__ = ("_backend",)
    ended = True

    def __init__(self, backend):
        self._backend = backend

    def read(self, buf, offset, length):
        return self._backend.readinto(buf, offset, length)

    def write(self, view, offset):
        self._backend.write(view, offset)


class _In:
    """A Source read in order.  The chunk lands at the offset's alignment
    in the buffer, so O_DIRECT writes it without copying the middle."""

    __slots__ = ("_source", "_stop_at_fd", "ended")

    def __init__(self, source, stop_at_fd=False):
        self._source = source
        self._stop_at_fd = stop_at_fd
        self.ended = False

    def read(self, buf, offset, length):
        source = self._source
        start = offset % ALIGN
        done = 0
        with memoryview(buf) as view:
            while done < length:
                fd = source.fd
                if fd >= 0:
                    if self._stop_at_fd:
                        break  # The caller's C loop takes the socket.
                    got = stream.recv_into(fd, buf, start + done,
                                           length - done, source.timeout)
                    source.consumed(got)
                    done += got
                    if done < length:
                        self.ended = True
                    break
                got = source.readinto(view[start + done:start + length])
                if not got:
                    self.ended = True
                    break
                done += got
        return memoryview(buf)[start:start + done]


class _Out:
    """A Sink written in order."""

    __slots__ = ("_sink",)

    def __init__(self, sink):
        self._sink = sink

    def write(self, view, offset):
        self._sink.write(view)


class _Tap:
    """A destination whose bytes ``tap(offset, view)`` sees first."""

    __slots__ = ("_dst", "_tap")

    def __init__(self, dst, tap):
        self._dst = dst
        self._tap = tap

    def write(self, view, offset):
        self._tap(offset, view)
        self._dst.write(view, offset)


def _tapped(dst, tap):
    return dst if tap is None else _Tap(dst, tap)


# The pump.

def _pump(src, dst, offset, length, buf, report, overlap):
    """Move ``[offset, offset + length)`` from ``src`` to ``dst``; return
    the bytes moved: ``length``, or fewer when a source asked to stop early
    (``stop_at_fd``).  Raises PartialContent when a stream ended early."""
    half = len(buf) // 2
    half -= half % ALIGN
    if overlap and half and length > half:
        return _overlapped(src, dst, offset, length, buf, report, half)
    end = offset + length
    step = len(buf) - len(buf) % ALIGN
    pos = offset
    while pos < end:
        n = _chunk(pos, end, step)
        view = src.read(buf, pos, n)
        got = len(view)
        if got:
            dst.write(view, pos)
        if got < n:
            return _short(src, length, pos + got - offset, report, got)
        pos += n
        report(n)
    return length


def _overlapped(src, dst, offset, length, buf, report, half):
    """The helper thread reads chunk i+1 into one half of ``buf`` while
    this thread writes chunk i from the other; the _io calls on both sides
    release the GIL."""
    parts = (buf.part(0, half), buf.part(half, half))
    helper = _helper()
    end = offset + length
    pos = offset
    n = _chunk(pos, end, half)
    pending = helper.submit(src.read, parts[0], pos, n)
    i = 0
    try:
        while pending is not None:
            view = pending.result()
            pending = None
            got = len(view)
            nxt = pos + n
            if got == n and nxt < end:
                next_n = _chunk(nxt, end, half)
                pending = helper.submit(src.read, parts[i ^ 1], nxt, next_n)
            if got:
                dst.write(view, pos)
            if got < n:
                return _short(src, length, pos + got - offset, report, got)
            report(n)
            if pending is not None:
                pos, n, i = nxt, next_n, i ^ 1
        return length
    finally:
        # Never hand the buffer back while the helper still fills it.
        if pending is not None:
            concurrent.futures.wait([pending])


def _short(src, length, done, report, got):
    if src.ended:
        raise errors.PartialContent(length, done)
    # The source stopped so the caller's fast path can take over.
    if got:
        report(got)
    return done


def _chunk(offset, end, step):
    """Length of the chunk at ``offset``: its aligned superset fits in
    ``step`` bytes, and chunks after the first start aligned."""
    return min(end, offset - offset % ALIGN + step) - offset


def _helper():
    """The calling thread's helper: one per thread that transfers (a
    connection's, a client worker's), started on first use and gone with
    its thread."""
    helper = getattr(_local, "helper", None)
    if helper is None:
        helper = _local.helper = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="ops")
    return helper
