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
"""

from libc.errno cimport (
    EAGAIN, EINTR, ENOMEM, ENOTCONN, EPROTO, ETIMEDOUT, errno)
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy, strcmp, strlen, strncmp, strncpy

from imageio._io cimport libnbd as lib
from imageio._io.timeouts cimport now_ms, timeout_ms

import os


cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum:
        POLLIN
        POLLOUT
        POLLERR
        POLLHUP
        POLLNVAL


cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    enum:
        MSG_DONTWAIT
        MSG_NOSIGNAL


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


class Error(OSError):
    """A libnbd call failed.

    ``errno`` is ``nbd_get_errno()`` (may be 0), ``strerror`` is
    ``nbd_get_error()``'s text.
    """

    def __str__(self):
        return self.strerror or "libnbd error"


# Where a failure happened, recorded without the GIL and raised later.
cdef enum FailKind:
    FAIL_NONE = 0
    FAIL_NBD        # a libnbd call failed: nbd_get_errno/nbd_get_error
    FAIL_OS         # a syscall on the client socket failed: errno
    FAIL_TIMEOUT    # nothing happened for the timeout
    FAIL_PROTOCOL   # the server answered something we cannot use

cdef struct Failure:
    FailKind kind
    int err
    char msg[512]


cdef void _fail_nbd(Failure *f) noexcept nogil:
    if f.kind != FAIL_NONE:
        return
    f.kind = FAIL_NBD
    f.err = lib.nbd_get_errno()
    cdef const char *m = lib.nbd_get_error()
    if m == NULL:
        m = "unknown libnbd error"
    strncpy(f.msg, m, sizeof(f.msg) - 1)
    f.msg[sizeof(f.msg) - 1] = 0


cdef void _fail(Failure *f, FailKind kind, int err, const char *msg) noexcept nogil:
    if f.kind != FAIL_NONE:
        return
    f.kind = kind
    f.err = err
    strncpy(f.msg, msg, sizeof(f.msg) - 1)
    f.msg[sizeof(f.msg) - 1] = 0


cdef int _raise_failure(Failure *f) except -1:
    msg = f.msg.decode("utf-8", "replace")
    if f.kind == FAIL_NBD:
        raise Error(f.err, msg)
    if f.kind == FAIL_OS:
        # OSError() picks the subclass: BrokenPipeError, ConnectionResetError...
        raise OSError(f.err, os.strerror(f.err))
    if f.kind == FAIL_TIMEOUT:
        raise TimeoutError(ETIMEDOUT, msg)
    raise Error(f.err or EPROTO, msg)


cdef int _raise_last() except -1:
    cdef Failure f
    f.kind = FAIL_NONE
    _fail_nbd(&f)
    return _raise_failure(&f)


# Pipelined transfers.
#
# A ring of slots over the caller's buffer; slot i uses
# buf[i * req:(i + 1) * req].  Requests are issued in order into the ring
# and consumed in order from its head.

cdef struct Pipe:
    lib.nbd_handle *h
    int fd                  # client socket, -1 for memory transfers
    char *buf
    bint linear             # memory transfer: buf[k] <-> start + k
    uint64_t start
    size_t req              # bytes per request
    int depth               # slots in the ring
    uint64_t next           # next offset to issue (or receive into)
    uint64_t end            # end of the transfer
    int head                # oldest slot
    int used                # slots holding data or a request
    int64_t cookie[MAX_DEPTH]   # request in flight, 0 if none
    uint64_t off[MAX_DEPTH]
    size_t len[MAX_DEPTH]
    size_t done[MAX_DEPTH]  # bytes sent to / received from the socket
    bint ready[MAX_DEPTH]   # the NBD request completed
    int timeout_ms
    uint64_t moved          # bytes delivered to the sink
    uint64_t received       # PUT: bytes received from the socket
    bint eof                # PUT: the client closed before `end`
    Failure f


cdef void _pipe_init(Pipe *p, lib.nbd_handle *h, int fd, char *buf,
                     size_t buflen, uint64_t offset, uint64_t length,
                     size_t max_req, int timeout_ms) noexcept nogil:
    cdef size_t req = request_size
    cdef int depth
    if req > max_req:
        req = max_req
    depth = <int>(buflen // req)
    if depth > depth_limit:
        depth = depth_limit
    if depth < 4 and depth < depth_limit:
        # A small buffer: smaller requests, still several in flight.
        req = buflen // 4
        req -= req % 4096
        if req < MIN_REQUEST_SIZE:
            req = MIN_REQUEST_SIZE if buflen >= MIN_REQUEST_SIZE else buflen
        depth = <int>(buflen // req)
        if depth > depth_limit:
            depth = depth_limit
    p.h = h
    p.fd = fd
    p.buf = buf
    p.linear = False
    p.start = offset
    p.req = req
    p.depth = depth
    p.next = offset
    p.end = offset + length
    p.head = 0
    p.used = 0
    p.timeout_ms = timeout_ms
    p.moved = 0
    p.received = 0
    p.eof = False
    p.f.kind = FAIL_NONE
    cdef int i
    for i in range(MAX_DEPTH):
        p.cookie[i] = 0
        p.off[i] = 0
        p.len[i] = 0
        p.done[i] = 0
        p.ready[i] = False


cdef inline int _tail(Pipe *p) noexcept nogil:
    return (p.head + p.used) % p.depth


cdef int _wait(Pipe *p, short client_events) noexcept nogil:
    """Wait for the NBD socket (as libnbd wants) and the client socket."""
    cdef pollfd fds[2]
    cdef unsigned dir
    cdef int r
    if lib.nbd_aio_is_dead(p.h) or lib.nbd_aio_is_closed(p.h):
        _fail(&p.f, FAIL_NBD, ENOTCONN, "NBD server connection is closed")
        return -1
    fds[0].fd = lib.nbd_aio_get_fd(p.h)
    fds[0].events = 0
    fds[0].revents = 0
    dir = lib.nbd_aio_get_direction(p.h)
    if dir & lib.LIBNBD_AIO_DIRECTION_READ:
        fds[0].events |= POLLIN
    if dir & lib.LIBNBD_AIO_DIRECTION_WRITE:
        fds[0].events |= POLLOUT
    fds[1].fd = p.fd if client_events else -1
    fds[1].events = client_events
    fds[1].revents = 0
    r = poll(fds, 2, p.timeout_ms)
    if r < 0:
        if errno == EINTR:
            return 0
        _fail(&p.f, FAIL_OS, errno, "poll")
        return -1
    if r == 0:
        if client_events:
            _fail(&p.f, FAIL_TIMEOUT, ETIMEDOUT,
                  "Timed out waiting for the client socket")
        else:
            _fail(&p.f, FAIL_TIMEOUT, ETIMEDOUT,
                  "Timed out waiting for the NBD server")
        return -1
    if fds[0].revents & (POLLIN | POLLHUP | POLLERR | POLLNVAL):
        if lib.nbd_aio_notify_read(p.h) == -1:
            _fail_nbd(&p.f)
            return -1
    elif fds[0].revents & POLLOUT:
        if lib.nbd_aio_notify_write(p.h) == -1:
            _fail_nbd(&p.f)
            return -1
    return 0


cdef int _issue(Pipe *p, bint write) noexcept nogil:
    """Issue a request for the next range into the tail slot."""
    cdef int i = _tail(p)
    cdef size_t n = p.req
    cdef int64_t cookie
    cdef char *ptr
    if p.end - p.next < n:
        n = <size_t>(p.end - p.next)
    if p.linear:
        ptr = p.buf + <size_t>(p.next - p.start)
    else:
        ptr = p.buf + <size_t>i * p.req
    if write:
        cookie = lib.nbd_aio_pwrite(p.h, ptr, n, p.next,
                                    lib.NBD_NULL_COMPLETION, 0)
    else:
        cookie = lib.nbd_aio_pread(p.h, ptr, n, p.next,
                                   lib.NBD_NULL_COMPLETION, 0)
    if cookie == -1:
        _fail_nbd(&p.f)
        return -1
    p.cookie[i] = cookie
    p.off[i] = p.next
    p.len[i] = n
    p.done[i] = 0
    p.ready[i] = False
    p.next += n
    p.used += 1
    return 0


cdef int _check_head(Pipe *p) noexcept nogil:
    """Return 1 if the head's request completed, 0 if not yet, -1 on error."""
    cdef int i = p.head
    cdef int r
    if p.ready[i]:
        return 1
    r = lib.nbd_aio_command_completed(p.h, p.cookie[i])
    if r == 0:
        return 0
    # Completed or failed, the command is retired either way.
    p.cookie[i] = 0
    if r == -1:
        _fail_nbd(&p.f)
        return -1
    p.ready[i] = True
    return 1


cdef void _pop(Pipe *p) noexcept nogil:
    p.ready[p.head] = False
    p.head = (p.head + 1) % p.depth
    p.used -= 1


cdef int _drain(Pipe *p) noexcept nogil:
    """After a failure: wait until libnbd no longer touches our buffer.

    Returns 0 when every request was retired, -1 if that cannot be known in
    time (server hung, handle dead with requests not retired); the caller
    must then close the handle, which frees them.
    """
    cdef int64_t deadline = now_ms() + DRAIN_TIMEOUT_MS
    cdef int i, r
    for i in range(p.depth):
        while p.cookie[i] != 0:
            r = lib.nbd_aio_command_completed(p.h, p.cookie[i])
            if r != 0:
                p.cookie[i] = 0
                break
            if lib.nbd_aio_is_dead(p.h) or lib.nbd_aio_is_closed(p.h):
                return -1
            if now_ms() > deadline:
                return -1
            if lib.nbd_poll(p.h, 1000) == -1:
                return -1
    return 0


cdef int _pump_send(Pipe *p, uint64_t until) noexcept nogil:
    """GET: move data NBD -> socket until `until` bytes were sent."""
    cdef int i, r
    cdef ssize_t n
    cdef short want
    while p.used > 0 and p.moved < until:
        i = p.head
        r = _check_head(p)
        if r < 0:
            return -1
        want = 0
        if r == 1:
            n = send(p.fd, p.buf + <size_t>i * p.req + p.done[i],
                     p.len[i] - p.done[i], MSG_DONTWAIT | MSG_NOSIGNAL)
            if n >= 0:
                p.done[i] += n
                p.moved += n
                if p.done[i] == p.len[i]:
                    _pop(p)
                    if p.next < p.end and _issue(p, False) < 0:
                        return -1
                continue
            if errno == EINTR:
                continue
            if errno != EAGAIN:
                _fail(&p.f, FAIL_OS, errno, "send")
                return -1
            want = POLLOUT
        if _wait(p, want) < 0:
            return -1
    return 0


cdef int _pump_recv(Pipe *p, uint64_t until) noexcept nogil:
    """PUT: move data socket -> NBD until `until` bytes were written."""
    cdef int i, r, fill
    cdef ssize_t n
    cdef short want
    while p.moved < until:
        # Retire completed writes from the head of the ring.
        while p.used > 0 and p.cookie[p.head] != 0:
            r = _check_head(p)
            if r < 0:
                return -1
            if r == 0:
                break
            p.moved += p.len[p.head]
            _pop(p)
        if p.moved >= until:
            break
        want = 0
        if p.received < p.end and not p.eof:
            # The slot being filled: the tail, or a new one if room.
            fill = (p.head + p.used - 1) % p.depth
            if p.used == 0 or p.cookie[fill] != 0:
                if p.used < p.depth:
                    fill = _tail(p)
                    p.off[fill] = p.received
                    p.len[fill] = p.req
                    if p.end - p.received < p.req:
                        p.len[fill] = <size_t>(p.end - p.received)
                    p.done[fill] = 0
                    p.cookie[fill] = 0
                    p.used += 1
                else:
                    fill = -1
            if fill >= 0:
                n = recv(p.fd, p.buf + <size_t>fill * p.req + p.done[fill],
                         p.len[fill] - p.done[fill], MSG_DONTWAIT)
                if n > 0:
                    p.done[fill] += n
                    p.received += n
                    if p.done[fill] == p.len[fill]:
                        p.cookie[fill] = lib.nbd_aio_pwrite(
                            p.h, p.buf + <size_t>fill * p.req, p.len[fill],
                            p.off[fill], lib.NBD_NULL_COMPLETION, 0)
                        if p.cookie[fill] == -1:
                            p.cookie[fill] = 0
                            _fail_nbd(&p.f)
                            return -1
                    continue
                if n == 0:
                    # Short body: the caller reports it; the partial slot
                    # is not written.
                    p.eof = True
                    if p.used > 0 and p.cookie[(p.head + p.used - 1) % p.depth] == 0:
                        p.used -= 1
                    continue
                if errno == EINTR:
                    continue
                if errno != EAGAIN:
                    _fail(&p.f, FAIL_OS, errno, "recv")
                    return -1
                want = POLLIN
        elif p.used == 0:
            # Nothing in flight and nothing more to receive.
            break
        if _wait(p, want) < 0:
            return -1
    return 0


cdef int _pump_mem(Pipe *p, bint write) noexcept nogil:
    """Memory transfers: buf[k] <-> offset + k, requests in flight."""
    cdef int r
    while p.next < p.end and p.used < p.depth:
        if _issue(p, write) < 0:
            return -1
    while p.used > 0:
        r = _check_head(p)
        if r < 0:
            return -1
        if r == 1:
            p.moved += p.len[p.head]
            _pop(p)
            if p.next < p.end and _issue(p, write) < 0:
                return -1
            continue
        if lib.nbd_poll(p.h, p.timeout_ms) <= 0:
            if lib.nbd_aio_is_dead(p.h) or lib.nbd_aio_is_closed(p.h):
                _fail(&p.f, FAIL_NBD, ENOTCONN, "NBD server connection is closed")
            elif p.timeout_ms >= 0:
                _fail(&p.f, FAIL_TIMEOUT, ETIMEDOUT,
                      "Timed out waiting for the NBD server")
            else:
                _fail_nbd(&p.f)
            return -1
    return 0


# Block status.

cdef enum CombineKind:
    COMBINE_RAW     # out |= value
    COMBINE_BIT     # out |= bit if value & mask
    COMBINE_ZERO    # out |= bit if value == 0

cdef struct Context:
    const char *name
    CombineKind kind
    uint32_t mask
    uint32_t bit
    uint32_t *entries       # (length, flags) pairs from the last reply
    size_t n                # uint32 values in entries
    size_t cap
    bint seen

cdef struct Walk:
    int n
    Context ctx[MAX_CONTEXTS]
    # Merged output: start, length, flags.
    uint64_t *out
    size_t nout
    size_t capout
    int err


cdef int _extent_cb(void *user_data, const char *metacontext,
                    uint64_t offset, uint32_t *entries, size_t nr_entries,
                    int *error) noexcept nogil:
    cdef Walk *w = <Walk *>user_data
    cdef Context *c
    cdef uint32_t *p
    cdef int i
    for i in range(w.n):
        c = &w.ctx[i]
        if strcmp(metacontext, c.name) != 0:
            continue
        if c.seen:
            # A buggy server answering twice: keep the first.
            return 0
        c.seen = True
        nr_entries -= nr_entries % 2
        if nr_entries > c.cap:
            p = <uint32_t *>realloc(c.entries, nr_entries * sizeof(uint32_t))
            if p == NULL:
                w.err = ENOMEM
                error[0] = ENOMEM
                return -1
            c.entries = p
            c.cap = nr_entries
        memcpy(c.entries, entries, nr_entries * sizeof(uint32_t))
        c.n = nr_entries
        return 0
    return 0


cdef int _emit(Walk *w, uint64_t start, uint64_t length, uint32_t flags) noexcept nogil:
    cdef uint64_t *p
    cdef size_t last
    if w.nout > 0:
        last = (w.nout - 1) * 3
        if w.out[last + 2] == flags and w.out[last] + w.out[last + 1] == start:
            w.out[last + 1] += length
            return 0
    if w.nout == w.capout:
        w.capout = w.capout * 2 if w.capout else 1024
        p = <uint64_t *>realloc(w.out, w.capout * 3 * sizeof(uint64_t))
        if p == NULL:
            return -1
        w.out = p
    w.out[w.nout * 3] = start
    w.out[w.nout * 3 + 1] = length
    w.out[w.nout * 3 + 2] = flags
    w.nout += 1
    return 0


cdef inline uint32_t _combine(Context *c, uint32_t value) noexcept nogil:
    if c.kind == COMBINE_RAW:
        return value
    if c.kind == COMBINE_BIT:
        return c.bit if value & c.mask else 0
    return c.bit if value == 0 else 0


cdef int _walk(lib.nbd_handle *h, Walk *w, uint64_t offset, uint64_t length,
               Failure *f) noexcept nogil:
    """Walk block status of [offset, offset + length) for w's contexts."""
    cdef uint64_t end = offset + length
    cdef uint64_t count, covered, adv, pos, seg, sum_
    cdef uint64_t rem[MAX_CONTEXTS]
    cdef size_t idx[MAX_CONTEXTS]
    cdef lib.nbd_extent_callback cb
    cdef uint32_t flags
    cdef int i, r
    cdef size_t k
    cb.callback = _extent_cb
    cb.user_data = w
    cb.free = NULL
    while offset < end:
        count = end - offset
        if count > MAX_BLOCK_STATUS:
            count = MAX_BLOCK_STATUS
        for i in range(w.n):
            w.ctx[i].seen = False
            w.ctx[i].n = 0
        r = lib.nbd_block_status(h, count, offset, cb, 0)
        if r == -1:
            if w.err:
                _fail(f, FAIL_OS, w.err, "Out of memory")
            else:
                _fail_nbd(f)
            return -1
        # Advance by what every context covered.
        adv = count
        for i in range(w.n):
            sum_ = 0
            k = 0
            while k < w.ctx[i].n and sum_ < count:
                sum_ += w.ctx[i].entries[k]
                k += 2
            if sum_ < adv:
                adv = sum_
            rem[i] = w.ctx[i].entries[0] if w.ctx[i].n else 0
            idx[i] = 0
        if adv == 0:
            _fail(f, FAIL_PROTOCOL, EPROTO,
                  "NBD server returned no block status")
            return -1
        pos = offset
        while pos < offset + adv:
            seg = offset + adv - pos
            flags = 0
            for i in range(w.n):
                # Skip zero-length entries a server may send.
                while rem[i] == 0:
                    idx[i] += 2
                    rem[i] = w.ctx[i].entries[idx[i]]
                if rem[i] < seg:
                    seg = rem[i]
                flags |= _combine(&w.ctx[i], w.ctx[i].entries[idx[i] + 1])
            if _emit(w, pos, seg, flags) < 0:
                _fail(f, FAIL_OS, ENOMEM, "Out of memory")
                return -1
            for i in range(w.n):
                rem[i] -= seg
            pos += seg
        offset += adv
    return 0


cdef struct Names:
    char **names
    size_t n


cdef int _list_cb(void *user_data, const char *name) noexcept nogil:
    cdef Names *names = <Names *>user_data
    cdef char **p
    cdef size_t size = strlen(name) + 1
    cdef char *copy = <char *>realloc(NULL, size)
    if copy == NULL:
        return 0
    memcpy(copy, name, size)
    p = <char **>realloc(names.names, (names.n + 1) * sizeof(char *))
    if p == NULL:
        free(copy)
        return 0
    names.names = p
    names.names[names.n] = copy
    names.n += 1
    return 0


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
