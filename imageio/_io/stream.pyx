"""Copy loops between files and sockets, in C with the GIL released.

- ``send_file``: file → socket.  Buffered fds use ``sendfile(2)`` (no copy
  through user space); O_DIRECT fds read aligned windows into the caller's
  AlignedBuffer and ``send`` them.
- ``recv_to_file``: socket → file.  Receives into the caller's buffer, placed
  so the bytes have the same alignment in memory as in the file, then writes
  with ``directio``'s O_DIRECT-aware writer.

Sockets may be non-blocking (a Python socket with a timeout): on EAGAIN the
loops ``poll`` for up to ``timeout`` seconds (None or negative: forever)
without progress, then raise TimeoutError.  A peer that goes away raises
BrokenPipeError / ConnectionResetError (OSError subclasses from the errno).
"""


from imageio._io.buffer cimport AlignedBuffer
from imageio._io.timeouts cimport now_ms, timeout_ms
from imageio._io cimport syscalls as sc
from imageio._io.syscalls cimport off_t
from imageio._io.directio cimport (
    check_offset, pread_full, raise_errno, write_data)

cdef enum:
    # Not an errno: poll ran out of time.
    TIMED_OUT = -100000
    # sendfile() moves at most this much per call; a bound keeps calls short.
    SENDFILE_MAX = 1 << 30


cdef ssize_t wait_fd(int fd, short events, int timeout) noexcept nogil:
    """Wait until fd is ready for events; 0, TIMED_OUT or -errno."""
    cdef sc.pollfd pfd
    cdef long long deadline = now_ms() + timeout if timeout >= 0 else 0
    cdef int left = timeout
    cdef int r
    pfd.fd = fd
    pfd.events = events
    while True:
        r = sc.poll(&pfd, 1, left)
        if r > 0:
            # Errors and hangups show up on the next send/recv with their
            # errno.
            return 0
        if r == 0:
            return TIMED_OUT
        if sc.errno != sc.EINTR:
            return -sc.errno
        if timeout >= 0:
            left = <int>max(deadline - now_ms(), 0)


cdef ssize_t send_all(int sock, const char *p, size_t n,
                      int timeout) noexcept nogil:
    """Send all n bytes; 0, TIMED_OUT or -errno."""
    cdef ssize_t r
    while n:
        r = sc.send(sock, p, n, sc.MSG_NOSIGNAL)
        if r >= 0:
            p += r
            n -= r
        elif sc.errno == sc.EAGAIN:
            r = wait_fd(sock, sc.POLLOUT, timeout)
            if r < 0:
                return r
        elif sc.errno != sc.EINTR:
            return -sc.errno
    return 0


cdef ssize_t sendfile_loop(int sock, int fd, off_t offset, size_t length,
                           int timeout) noexcept nogil:
    """sendfile() until length bytes or end of file; count or error."""
    cdef off_t off = offset
    cdef size_t sent = 0
    cdef ssize_t r
    while sent < length:
        r = sc.sendfile(sock, fd, &off, min(length - sent, <size_t>SENDFILE_MAX))
        if r > 0:
            sent += r
        elif r == 0:
            break
        elif sc.errno == sc.EAGAIN:
            r = wait_fd(sock, sc.POLLOUT, timeout)
            if r < 0:
                return r
        elif sc.errno != sc.EINTR:
            return -sc.errno
    return sent


cdef ssize_t read_send_loop(int sock, int fd, off_t offset, size_t length,
                            char *buf, size_t size, size_t align,
                            int timeout) noexcept nogil:
    """Aligned pread into buf then send, until length bytes or end of
    file; count or error."""
    cdef size_t window = size - size % align
    cdef size_t sent = 0
    cdef size_t skip, n, want
    cdef off_t first
    cdef ssize_t got, r
    while sent < length:
        first = (offset + sent) & ~(<off_t>align - 1)
        skip = offset + sent - first
        want = min(window, skip + length - sent)
        want = (want + align - 1) & ~(align - 1)
        got = pread_full(fd, buf, want, first, align)
        if got < 0:
            return got
        if <size_t>got <= skip:
            break
        n = min(length - sent, got - skip)
        r = send_all(sock, buf + skip, n, timeout)
        if r < 0:
            return r
        sent += n
        if <size_t>got < want:
            break
    return sent


cdef ssize_t recv_full(int sock, char *p, size_t n, int timeout) noexcept nogil:
    """Receive n bytes, fewer only at end of stream; count or error."""
    cdef size_t done = 0
    cdef ssize_t r
    while done < n:
        r = sc.recv(sock, p + done, n - done, 0)
        if r > 0:
            done += r
        elif r == 0:
            break
        elif sc.errno == sc.EAGAIN:
            r = wait_fd(sock, sc.POLLIN, timeout)
            if r < 0:
                return r
        elif sc.errno != sc.EINTR:
            return -sc.errno
    return done


cdef int check(ssize_t r, timeout) except -1:
    if r == TIMED_OUT:
        raise TimeoutError("Socket not ready within {} seconds".format(timeout))
    if r < 0:
        raise_errno(r)
    return 0


def send_file(int sock_fd, int file_fd, off_t offset, size_t length,
              AlignedBuffer buf not None, size_t align=0, timeout=None):
    """Send ``length`` bytes of ``file_fd`` at ``offset`` to ``sock_fd``.

    ``align`` is 0 or 1 for a buffered fd (``sendfile(2)``; ``buf`` unused),
    or the O_DIRECT alignment (aligned reads into ``buf``, then ``send``).
    Returns the bytes sent: fewer than ``length`` only at end of file.
    Raises TimeoutError when the socket accepts nothing for ``timeout``
    seconds, BrokenPipeError/ConnectionResetError when the peer went away,
    OSError for I/O errors.
    """
    cdef int ms = timeout_ms(timeout)
    cdef ssize_t r
    check_offset(offset)
    if align > 1:
        if align & (align - 1) or buf.align % align or buf.size < align:
            raise ValueError("Invalid alignment {} for {!r}".format(align, buf))
        with nogil:
            r = read_send_loop(sock_fd, file_fd, offset, length, buf.data,
                               buf.size, align, ms)
    else:
        with nogil:
            r = sendfile_loop(sock_fd, file_fd, offset, length, ms)
    check(r, timeout)
    return r


def recv_to_file(int sock_fd, int file_fd, off_t offset, size_t length,
                 AlignedBuffer buf not None, AlignedBuffer bounce=None,
                 size_t align=0, timeout=None, lock=None):
    """Receive ``length`` bytes (at most ``len(buf)``) from ``sock_fd`` and
    write them at ``offset`` of ``file_fd``.

    With ``align`` > 1 (O_DIRECT) the bytes land in ``buf`` at the same
    alignment they have in the file when ``offset % align + length <=
    len(buf)``, so only an unaligned head or tail goes through ``bounce``
    (see ``directio.write``, also for ``lock``).  Returns the bytes received
    and written: fewer than ``length`` only when the peer closed.  Raises
    TimeoutError, ConnectionResetError, OSError like ``send_file``.
    """
    cdef int ms = timeout_ms(timeout)
    cdef size_t skip = 0
    cdef ssize_t r
    check_offset(offset)
    if length > buf.size:
        raise ValueError("Cannot receive {} bytes into a buffer of {} bytes"
                         .format(length, buf.size))
    if align > 1 and offset % align + length <= buf.size:
        skip = offset % align
    with nogil:
        r = recv_full(sock_fd, buf.data + skip, length, ms)
    check(r, timeout)
    if r:
        write_data(file_fd, buf.data + skip, r, offset, bounce, align, lock)
    return r


def recv_into(int sock_fd, AlignedBuffer buf not None, size_t start,
              size_t length, timeout=None):
    """Receive ``length`` bytes from ``sock_fd`` into ``buf[start:start +
    length]``, looping in C with the GIL released.

    Returns the bytes received: fewer than ``length`` only when the peer
    closed.  Raises TimeoutError, ConnectionResetError, OSError like
    ``send_file``.  Lets a caller receive one buffer while another thread
    writes the previous one to storage.
    """
    cdef int ms = timeout_ms(timeout)
    cdef ssize_t r
    if start > buf.size or length > buf.size - start:
        raise ValueError("Cannot receive {} bytes at {} into a buffer of {} "
                         "bytes".format(length, start, buf.size))
    with nogil:
        r = recv_full(sock_fd, buf.data + start, length, ms)
    check(r, timeout)
    return r


def send_from(int sock_fd, AlignedBuffer buf not None, size_t start,
              size_t length, timeout=None):
    """Send ``buf[start:start + length]`` to ``sock_fd``, looping in C with
    the GIL released.  Raises TimeoutError, BrokenPipeError, OSError like
    ``send_file``.  Lets a caller send one buffer while another thread
    reads the next one from storage."""
    cdef int ms = timeout_ms(timeout)
    cdef ssize_t r
    if start > buf.size or length > buf.size - start:
        raise ValueError("Cannot send {} bytes at {} from a buffer of {} "
                         "bytes".format(length, start, buf.size))
    with nogil:
        r = send_all(sock_fd, buf.data + start, length, ms)
    check(r, timeout)
