# Pipelined transfers.
# Included by nbd.pyx (its cimports and constants are in scope).
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
