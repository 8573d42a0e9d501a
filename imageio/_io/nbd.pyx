"""NBD I/O through libnbd's C API.

``Handle`` wraps one ``struct nbd_handle``: one connection to one export.
Every blocking libnbd call runs with the GIL released.  Bulk transfers keep
several requests in flight on the handle (like ``nbdcopy``) and complete them
in order:

- ``send_to_socket`` reads from NBD and sends to a plain socket fd,
- ``recv_from_socket`` receives from a plain socket fd and writes to NBD,
- ``pread_pipelined``/``pwrite_pipelined`` do the same into or from a
  caller's buffer, for TLS sockets that Python must drive.

Block status is walked in C: ``extents``, ``zero_extents`` and
``dirty_extents`` return compact, merged lists of tuples.

A handle is not thread safe from Python's point of view: use one per thread
(connection), as the daemon does.

The module is one extension in parts joined by ``include`` (as uvloop's
``loop.pyx``): ``failure.pxi`` (failures recorded without the GIL, raised
later), ``ring.pxi`` (the ring of requests in flight and its pumps),
``blockstatus.pxi`` (meta contexts and the block-status walk); ``Handle``
is here.  C declarations come from ``libnbd.pxd`` and ``syscalls.pxd`` only.
"""

from libc.stdint cimport int64_t, uint32_t, uint64_t

from imageio._io cimport libnbd as lib
from imageio._io.syscalls cimport (
    EAGAIN, EINTR, ENOMEM, ENOTCONN, EPROTO, ETIMEDOUT, MSG_DONTWAIT,
    MSG_NOSIGNAL, POLLERR, POLLHUP, POLLIN, POLLNVAL, POLLOUT, errno, free,
    memcpy, poll, pollfd, realloc, recv, send, strcmp, strlen, strncmp,
    strncpy)
from imageio._io.timeouts cimport now_ms, timeout_ms

import os


# Meta contexts.
BASE_ALLOCATION = "base:allocation"
ALLOCATION_DEPTH = "qemu:allocation-depth"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"

# base:allocation flags.
STATE_HOLE = lib.LIBNBD_STATE_HOLE
STATE_ZERO = lib.LIBNBD_STATE_ZERO

# Bulk transfers: requests of request_size bytes, at most depth_limit of
# them in flight (tune() changes both, for benchmarks).  2 MiB x 4-8 keeps
# qemu-nbd busy without hurting latency.
DEF MIN_REQUEST_SIZE = 64 * 1024
# NBD's default maximum payload when the server says nothing.
DEF DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024
DEF MAX_DEPTH = 32
cdef size_t request_size = 2 * 1024 * 1024
cdef int depth_limit = 8


def tune(size_t request_size_=0, int depth=0):
    """Set the bulk request size (bytes) and requests in flight; 0 keeps
    the current value.  Returns the (request_size, depth) in effect."""
    global request_size, depth_limit
    if request_size_:
        if request_size_ < 4096 or request_size_ > DEFAULT_MAX_PAYLOAD:
            raise ValueError("Invalid request size {}".format(request_size_))
        request_size = request_size_
    if depth:
        if depth < 1 or depth > MAX_DEPTH:
            raise ValueError("Invalid depth {}".format(depth))
        depth_limit = depth
    return request_size, depth_limit


# Largest block status request: the protocol's count is 32 bits.
cdef uint64_t MAX_BLOCK_STATUS = 0x100000000 - 0x100000

# Wait this long for requests in flight after a failure before giving up on
# the connection (milliseconds).
DEF DRAIN_TIMEOUT_MS = 30000

DEF MAX_CONTEXTS = 3


include "failure.pxi"
include "ring.pxi"
include "blockstatus.pxi"


cdef class Handle:
    """A connection to one NBD export.

    Create, then call one of the ``connect*`` methods once.  Raises
    ``Error`` (an ``OSError``) when libnbd fails.
    """

    cdef lib.nbd_handle *h
    cdef readonly object dirty_context
    cdef size_t max_request

    def __cinit__(self):
        self.h = lib.nbd_create()
        if self.h == NULL:
            _raise_last()
        # libnbd zeroes every read buffer first, in case a caller ignores a
        # failed read; every read here is checked, and the memset cost
        # 2.5% of a client upload's CPU (perf).
        lib.nbd_set_pread_initialize(self.h, False)
        self.dirty_context = None
        self.max_request = DEFAULT_MAX_PAYLOAD

    def __dealloc__(self):
        if self.h != NULL:
            with nogil:
                lib.nbd_close(self.h)
            self.h = NULL

    cdef lib.nbd_handle *_handle(self) except NULL:
        if self.h == NULL:
            raise ValueError("NBD handle is closed")
        return self.h

    # Connecting.

    cdef int _prepare(self, bint dirty) except -1:
        cdef lib.nbd_handle *h = self._handle()
        # qemu-nbd advertises its real alignment only to clients asking for
        # block sizes; without asking, any offset works (the server does
        # read-modify-write), like the established client.
        if lib.nbd_set_request_block_size(h, False) == -1:
            _raise_last()
        if lib.nbd_set_request_structured_replies(h, True) == -1:
            _raise_last()
        if lib.nbd_set_uri_allow_local_file(h, True) == -1:
            _raise_last()
        if dirty:
            # libnbd 1.14 has no way to ask for "any dirty bitmap" in
            # SET_META_CONTEXT: list them first, in option mode.
            if lib.nbd_set_opt_mode(h, True) == -1:
                _raise_last()
            if lib.nbd_add_meta_context(h, DIRTY_BITMAP_PREFIX.encode()) == -1:
                _raise_last()
        else:
            self._add_contexts(None)
        return 0

    cdef int _add_contexts(self, bytes bitmap) except -1:
        cdef lib.nbd_handle *h = self._handle()
        if lib.nbd_add_meta_context(h, BASE_ALLOCATION.encode()) == -1:
            _raise_last()
        if lib.nbd_add_meta_context(h, ALLOCATION_DEPTH.encode()) == -1:
            _raise_last()
        if bitmap is not None:
            if lib.nbd_add_meta_context(h, bitmap) == -1:
                _raise_last()
        return 0

    cdef int _finish(self, bint dirty) except -1:
        cdef lib.nbd_handle *h = self._handle()
        cdef Names names
        cdef int r
        cdef size_t i
        cdef lib.nbd_context_callback cb
        cdef int64_t maximum
        if dirty and lib.nbd_aio_is_negotiating(h) == 1:
            names.names = NULL
            names.n = 0
            cb.callback = _list_cb
            cb.user_data = &names
            cb.free = NULL
            with nogil:
                r = lib.nbd_opt_list_meta_context(h, cb)
            found = []
            for i in range(names.n):
                found.append(names.names[i].decode("utf-8", "replace"))
                free(names.names[i])
            free(names.names)
            # Like the established service: use the export's bitmap only
            # when there is exactly one.
            bitmaps = [n for n in found if n.startswith(DIRTY_BITMAP_PREFIX)
                       and len(n) > len(DIRTY_BITMAP_PREFIX)]
            bitmap = bitmaps[0].encode() if len(bitmaps) == 1 else None
            if lib.nbd_clear_meta_contexts(h) == -1:
                _raise_last()
            self._add_contexts(bitmap)
            with nogil:
                r = lib.nbd_opt_go(h)
            if r == -1:
                _raise_last()
            if bitmap is not None and lib.nbd_can_meta_context(h, bitmap) == 1:
                self.dirty_context = bitmap.decode()
        maximum = lib.nbd_get_block_size(h, lib.LIBNBD_SIZE_MAXIMUM)
        if maximum > 0 and <size_t>maximum < self.max_request:
            self.max_request = <size_t>maximum
        return 0

    def connect(self, str url, bint dirty=False, str tls_username=None):
        """Connect to an NBD URI (nbd://, nbds://, nbd+unix://, nbds+unix://).

        TLS query parameters (``tls-certificates``, ``tls-psk-file``) may
        name local files.  ``tls_username`` is the PSK user name when the
        URI has none (libnbd 1.14 ignores a ``tls-username`` parameter).
        With ``dirty``, negotiate the export's dirty bitmap
        (``dirty_context`` names it, or is None).
        """
        cdef lib.nbd_handle *h = self._handle()
        cdef bytes b = url.encode("utf-8")
        cdef const char *c = b
        cdef int r
        if tls_username is not None:
            if lib.nbd_set_tls_username(h, tls_username.encode("utf-8")) == -1:
                _raise_last()
        self._prepare(dirty)
        with nogil:
            r = lib.nbd_connect_uri(h, c)
        if r == -1:
            _raise_last()
        self._finish(dirty)

    def connect_unix(self, str path, str export="", bint dirty=False):
        """Connect to ``export`` on the unix socket ``path``."""
        cdef lib.nbd_handle *h = self._handle()
        cdef bytes p = path.encode("utf-8")
        cdef bytes e = export.encode("utf-8")
        cdef const char *cp = p
        cdef int r
        if lib.nbd_set_export_name(h, e) == -1:
            _raise_last()
        self._prepare(dirty)
        with nogil:
            r = lib.nbd_connect_unix(h, cp)
        if r == -1:
            _raise_last()
        self._finish(dirty)

    def connect_tcp(self, str host, port, str export="", bint dirty=False):
        """Connect to ``export`` on ``host``:``port`` over TCP."""
        cdef lib.nbd_handle *h = self._handle()
        cdef bytes bh = host.encode("utf-8")
        cdef bytes bp = str(port).encode("utf-8")
        cdef bytes e = export.encode("utf-8")
        cdef const char *ch = bh
        cdef const char *cp = bp
        cdef int r
        if lib.nbd_set_export_name(h, e) == -1:
            _raise_last()
        self._prepare(dirty)
        with nogil:
            r = lib.nbd_connect_tcp(h, ch, cp)
        if r == -1:
            _raise_last()
        self._finish(dirty)

    def close(self):
        """Disconnect politely and free the handle; idempotent."""
        cdef lib.nbd_handle *h = self.h
        if h == NULL:
            return
        self.h = NULL
        with nogil:
            if lib.nbd_aio_is_ready(h):
                lib.nbd_shutdown(h, 0)
            lib.nbd_close(h)

    @property
    def closed(self):
        return self.h == NULL

    # What the server offers.

    def size(self):
        """Export size in bytes."""
        cdef int64_t r = lib.nbd_get_size(self._handle())
        if r == -1:
            _raise_last()
        return r

    cdef bint _flag(self, int r) except -1:
        if r == -1:
            _raise_last()
        return r == 1

    def is_read_only(self):
        return self._flag(lib.nbd_is_read_only(self._handle()))

    def can_flush(self):
        return self._flag(lib.nbd_can_flush(self._handle()))

    def can_trim(self):
        return self._flag(lib.nbd_can_trim(self._handle()))

    def can_zero(self):
        return self._flag(lib.nbd_can_zero(self._handle()))

    def can_fast_zero(self):
        return self._flag(lib.nbd_can_fast_zero(self._handle()))

    def can_multi_conn(self):
        return self._flag(lib.nbd_can_multi_conn(self._handle()))

    def can_meta_context(self, str name):
        """True if the meta context ``name`` was negotiated."""
        return self._flag(
            lib.nbd_can_meta_context(self._handle(), name.encode("utf-8")))

    def is_connected(self):
        """True while the handle can carry commands."""
        return self.h != NULL and lib.nbd_aio_is_ready(self.h) == 1

    def peer_closed(self):
        """True when the server closed (or broke) the connection of an
        idle handle: libnbd notices only at its next read, so the socket
        is polled.  Only for a handle with no command in flight: a pending
        reply would read as a closed peer."""
        cdef pollfd fd
        if self.h == NULL or lib.nbd_aio_is_ready(self.h) != 1:
            return True
        fd.fd = lib.nbd_aio_get_fd(self.h)
        fd.events = POLLIN
        fd.revents = 0
        with nogil:
            r = poll(&fd, 1, 0)
        return r > 0 and (fd.revents & (POLLIN | POLLHUP | POLLERR | POLLNVAL)) != 0

    # Simple commands.

    def pread(self, unsigned char[::1] buf not None, uint64_t offset):
        """Fill ``buf`` with the export's bytes at ``offset``."""
        self.pread_pipelined(buf, offset, len(buf))

    def pwrite(self, const unsigned char[::1] buf not None, uint64_t offset):
        """Write all of ``buf`` at ``offset``."""
        self.pwrite_pipelined(buf, offset, len(buf))

    def zero(self, uint64_t offset, uint64_t length, bint no_hole=True):
        """NBD WRITE_ZEROES: make the range read as zeroes.

        ``no_hole`` (LIBNBD_CMD_FLAG_NO_HOLE) keeps the space allocated.
        """
        cdef lib.nbd_handle *h = self._handle()
        cdef uint32_t flags = lib.LIBNBD_CMD_FLAG_NO_HOLE if no_hole else 0
        cdef uint64_t n
        cdef int r = 0
        with nogil:
            while length > 0:
                # The protocol's count is 32 bits.
                n = length if length < 0x40000000 else 0x40000000
                r = lib.nbd_zero(h, n, offset, flags)
                if r == -1:
                    break
                offset += n
                length -= n
        if r == -1:
            _raise_last()

    def trim(self, uint64_t offset, uint64_t length):
        """NBD TRIM: the range may be deallocated; contents undefined."""
        cdef lib.nbd_handle *h = self._handle()
        cdef uint64_t n
        cdef int r = 0
        with nogil:
            while length > 0:
                n = length if length < 0x40000000 else 0x40000000
                r = lib.nbd_trim(h, n, offset, 0)
                if r == -1:
                    break
                offset += n
                length -= n
        if r == -1:
            _raise_last()

    def flush(self):
        """NBD FLUSH: make written data durable."""
        cdef lib.nbd_handle *h = self._handle()
        cdef int r
        with nogil:
            r = lib.nbd_flush(h, 0)
        if r == -1:
            _raise_last()

    # Pipelined transfers.

    cdef int _after_failure(self, Pipe *p) except -1:
        cdef lib.nbd_handle *h
        cdef int r
        with nogil:
            r = _drain(p)
        if r < 0:
            # libnbd may still write into the caller's buffer: only closing
            # the handle makes it safe to return.
            h = self.h
            self.h = NULL
            with nogil:
                lib.nbd_close(h)
        return 0

    def pread_pipelined(self, unsigned char[::1] buf not None,
                        uint64_t offset, size_t length, timeout=None):
        """Read ``length`` bytes at ``offset`` into ``buf[:length]``.

        Several requests are in flight at once.  Returns ``length``.
        """
        cdef Pipe p
        cdef lib.nbd_handle *h = self._handle()
        cdef int r
        if length > <size_t>buf.shape[0]:
            raise ValueError("length {} exceeds buffer size {}".format(
                length, buf.shape[0]))
        if length == 0:
            return 0
        _pipe_init(&p, h, -1, <char *>&buf[0], length, offset, length,
                   self.max_request, timeout_ms(timeout))
        # Memory transfers: a request size that splits the buffer evenly.
        p.linear = True
        p.req = min(self.max_request, request_size)
        p.depth = depth_limit
        with nogil:
            r = _pump_mem(&p, False)
        if r < 0:
            self._after_failure(&p)
            _raise_failure(&p.f)
        return length

    def pwrite_pipelined(self, const unsigned char[::1] buf not None,
                         uint64_t offset, size_t length, timeout=None):
        """Write ``buf[:length]`` at ``offset``, several requests in flight.

        Returns ``length``.
        """
        cdef Pipe p
        cdef lib.nbd_handle *h = self._handle()
        cdef int r
        if length > <size_t>buf.shape[0]:
            raise ValueError("length {} exceeds buffer size {}".format(
                length, buf.shape[0]))
        if length == 0:
            return 0
        _pipe_init(&p, h, -1, <char *>&buf[0], length, offset, length,
                   self.max_request, timeout_ms(timeout))
        p.linear = True
        p.req = min(self.max_request, request_size)
        p.depth = depth_limit
        with nogil:
            r = _pump_mem(&p, True)
        if r < 0:
            self._after_failure(&p)
            _raise_failure(&p.f)
        return length

    def send_to_socket(self, int fd, uint64_t offset, uint64_t length,
                       unsigned char[::1] buf not None, timeout=None,
                       progress=None):
        """Send ``length`` bytes at ``offset`` to the socket ``fd``.

        ``buf`` is scratch space holding the requests in flight.  The socket
        may be non-blocking: the loop polls, and raises ``TimeoutError``
        when nothing moves for ``timeout`` seconds (None: wait forever).
        ``progress(n)`` is called with the bytes sent, about once per
        ``len(buf)`` bytes; an exception it raises stops the transfer.
        Returns ``length``.
        """
        cdef Pipe p
        cdef lib.nbd_handle *h = self._handle()
        cdef int r = 0
        cdef uint64_t until, reported = 0
        cdef uint64_t step = <uint64_t>buf.shape[0]
        if length == 0:
            return 0
        if buf.shape[0] < 4096:
            raise ValueError("buffer too small: {}".format(buf.shape[0]))
        _pipe_init(&p, h, fd, <char *>&buf[0], buf.shape[0], offset, length,
                   self.max_request, timeout_ms(timeout))
        with nogil:
            while p.next < p.end and p.used < p.depth:
                r = _issue(&p, False)
                if r < 0:
                    break
        try:
            while r == 0 and p.moved < length:
                until = p.moved + step if progress is not None else length
                with nogil:
                    r = _pump_send(&p, until)
                if r == 0 and progress is not None:
                    progress(p.moved - reported)
                    reported = p.moved
        except BaseException:
            self._after_failure(&p)
            raise
        if r < 0:
            self._after_failure(&p)
            _raise_failure(&p.f)
        return length

    def recv_from_socket(self, int fd, uint64_t offset, uint64_t length,
                         unsigned char[::1] buf not None, timeout=None,
                         progress=None):
        """Receive ``length`` bytes from the socket ``fd``, write at ``offset``.

        Returns the bytes received: less than ``length`` when the peer
        closed early (the incomplete tail is not written).  Timeouts and
        ``progress`` as for ``send_to_socket``.  Does not flush.
        """
        cdef Pipe p
        cdef lib.nbd_handle *h = self._handle()
        cdef int r = 0
        cdef uint64_t until, reported = 0
        cdef uint64_t step = <uint64_t>buf.shape[0]
        if length == 0:
            return 0
        if buf.shape[0] < 4096:
            raise ValueError("buffer too small: {}".format(buf.shape[0]))
        _pipe_init(&p, h, fd, <char *>&buf[0], buf.shape[0], offset, length,
                   self.max_request, timeout_ms(timeout))
        # Receive positions are absolute offsets too.
        p.received = offset
        try:
            while r == 0 and p.moved < length and not (p.eof and p.used == 0):
                until = p.moved + step if progress is not None else length
                with nogil:
                    r = _pump_recv(&p, until)
                if r == 0 and progress is not None and p.moved > reported:
                    progress(p.moved - reported)
                    reported = p.moved
        except BaseException:
            self._after_failure(&p)
            raise
        if r < 0:
            self._after_failure(&p)
            _raise_failure(&p.f)
        return p.received - offset

    # Block status.

    cdef list _walk(self, list contexts, uint64_t offset, length):
        """contexts: (name, kind, mask, bit) for negotiated contexts."""
        cdef lib.nbd_handle *h = self._handle()
        cdef Walk w
        cdef Failure f
        cdef int r, i
        cdef uint64_t size = <uint64_t>self.size()
        cdef uint64_t n
        cdef size_t k
        if length is None:
            n = size - offset if offset < size else 0
        else:
            n = length
        if offset + n > size:
            raise ValueError("range {}+{} beyond export size {}".format(
                offset, n, size))
        names = [c[0].encode("utf-8") for c in contexts]
        w.n = len(contexts)
        w.out = NULL
        w.nout = 0
        w.capout = 0
        w.err = 0
        f.kind = FAIL_NONE
        for i in range(w.n):
            w.ctx[i].name = names[i]
            w.ctx[i].kind = contexts[i][1]
            w.ctx[i].mask = contexts[i][2]
            w.ctx[i].bit = contexts[i][3]
            w.ctx[i].entries = NULL
            w.ctx[i].n = 0
            w.ctx[i].cap = 0
        try:
            if w.n == 0:
                r = _emit(&w, offset, n, 0) if n else 0
            else:
                with nogil:
                    r = _walk(h, &w, offset, n, &f)
            if r < 0:
                if f.kind == FAIL_NONE:
                    raise MemoryError()
                _raise_failure(&f)
            result = [None] * w.nout
            for k in range(w.nout):
                result[k] = (w.out[k * 3], w.out[k * 3 + 1],
                             <uint32_t>w.out[k * 3 + 2])
            return result
        finally:
            for i in range(w.n):
                free(w.ctx[i].entries)
            free(w.out)

    def extents(self, str context, uint64_t offset=0, length=None):
        """Block status of one meta context.

        Returns a list of ``(start, length, flags)`` covering
        ``[offset, offset + length)`` (default: to the end), adjacent
        extents with equal flags merged.
        """
        if not self.can_meta_context(context):
            raise LookupError("Meta context {} was not negotiated"
                              .format(context))
        return self._walk([(context, COMBINE_RAW, 0, 0)], offset, length)

    def zero_extents(self, uint64_t offset=0, length=None):
        """Returns a list of ``(start, length, zero, hole)``.

        ``zero`` from base:allocation's NBD_STATE_ZERO; ``hole`` where
        qemu:allocation-depth is 0 (unallocated in the top qcow2 layer),
        always False without that context.  Without base:allocation the
        range is one data extent.
        """
        contexts = []
        if self.can_meta_context(BASE_ALLOCATION):
            contexts.append((BASE_ALLOCATION, COMBINE_BIT, STATE_ZERO, 1))
        if self.can_meta_context(ALLOCATION_DEPTH):
            contexts.append((ALLOCATION_DEPTH, COMBINE_ZERO, 0, 2))
        return [(s, n, bool(f & 1), bool(f & 2))
                for s, n, f in self._walk(contexts, offset, length)]

    def reads_as_zero(self, uint64_t offset, uint64_t length):
        """True if base:allocation says all of [offset, offset+length)
        reads as zeroes (NBD_STATE_ZERO); False without base:allocation."""
        if not self.can_meta_context(BASE_ALLOCATION):
            return False
        for s, n, f in self._walk(
                [(BASE_ALLOCATION, COMBINE_BIT, STATE_ZERO, 1)],
                offset, length):
            if not f & 1:
                return False
        return True

    def dirty_extents(self, uint64_t offset=0, length=None):
        """Returns a list of ``(start, length, dirty, zero)``.

        ``dirty`` from the dirty bitmap negotiated by ``connect(dirty=True)``
        (raises ``LookupError`` when there is none), ``zero`` from
        base:allocation.
        """
        if self.dirty_context is None:
            raise LookupError("No dirty bitmap negotiated")
        contexts = [(self.dirty_context, COMBINE_BIT, 1, 1)]
        if self.can_meta_context(BASE_ALLOCATION):
            contexts.append((BASE_ALLOCATION, COMBINE_BIT, STATE_ZERO, 2))
        return [(s, n, bool(f & 1), bool(f & 2))
                for s, n, f in self._walk(contexts, offset, length)]
