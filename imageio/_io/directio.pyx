"""Reads and writes at any offset and length on fds opened with O_DIRECT.

O_DIRECT needs the file offset, the length and the memory address aligned
to the storage block size (``align``, 4096 works everywhere).  Callers
pass ``align`` > 1 for O_DIRECT fds and 1 (or 0) for buffered ones:

- ``readinto`` reads the aligned superset of the wanted range and says
  where the wanted bytes start;
- ``write`` writes the aligned middle straight from the caller's memory when
  it is aligned (else through a small aligned bounce buffer) and does
  read-modify-write of the blocks holding an unaligned head or tail.  A block
  at end of file is written with buffered I/O so the file never grows past
  what was asked.

Every blocking call runs with the GIL released.  Errors raise OSError with
the errno.
"""

import os

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport uint64_t

from imageio._io.buffer cimport AlignedBuffer
from imageio._io cimport syscalls as sc
from imageio._io.syscalls cimport off_t

FALLOC_FL_KEEP_SIZE = sc.FALLOC_FL_KEEP_SIZE
FALLOC_FL_PUNCH_HOLE = sc.FALLOC_FL_PUNCH_HOLE
FALLOC_FL_ZERO_RANGE = sc.FALLOC_FL_ZERO_RANGE

# Largest single read or write Linux performs.
cdef size_t MAX_RW = 0x7ffff000


cdef inline off_t align_down(off_t n, size_t align) noexcept nogil:
    return n & ~(<off_t>align - 1)


cdef inline off_t align_up(off_t n, size_t align) noexcept nogil:
    return (n + <off_t>align - 1) & ~(<off_t>align - 1)


cdef int raise_errno(ssize_t err) except -1:
    raise OSError(<int>-err, os.strerror(<int>-err))


cdef int check_align(size_t align) except -1:
    if align & (align - 1):
        raise ValueError("Invalid alignment: {}".format(align))
    return 0


cdef int check_offset(off_t offset) except -1:
    if offset < 0:
        raise ValueError("Invalid offset: {}".format(offset))
    return 0


cdef ssize_t pread_full(int fd, char *p, size_t n, off_t off,
                        size_t align) noexcept nogil:
    cdef size_t done = 0
    cdef ssize_t r
    while done < n:
        r = sc.pread(fd, p + done, min(n - done, MAX_RW), off + done)
        if r > 0:
            done += r
            # With O_DIRECT an unaligned short read means end of file, and
            # reading on from an unaligned offset would fail with EINVAL.
            if align > 1 and done % align:
                break
        elif r == 0:
            break
        elif sc.errno != sc.EINTR:
            return -sc.errno
    return done


cdef ssize_t pwrite_all(int fd, const char *p, size_t n,
                        off_t off) noexcept nogil:
    cdef size_t done = 0
    cdef ssize_t r
    while done < n:
        r = sc.pwrite(fd, p + done, min(n - done, MAX_RW), off + done)
        if r > 0:
            done += r
        elif r == 0:
            # Cannot happen for n > 0 on Linux; do not spin.
            return -5  # EIO
        elif sc.errno != sc.EINTR:
            return -sc.errno
    return 0


cdef ssize_t pwrite_buffered(int fd, const char *p, size_t n,
                             off_t off) noexcept nogil:
    """pwrite without O_DIRECT: for a partial block at end of file."""
    cdef int flags = sc.fcntl(fd, sc.F_GETFL)
    cdef ssize_t r
    if flags < 0:
        return -sc.errno
    if flags & sc.O_DIRECT:
        if sc.fcntl(fd, sc.F_SETFL, flags & ~sc.O_DIRECT) < 0:
            return -sc.errno
    r = pwrite_all(fd, p, n, off)
    if flags & sc.O_DIRECT:
        if sc.fcntl(fd, sc.F_SETFL, flags) < 0 and r == 0:
            r = -sc.errno
    return r


cdef ssize_t rmw(int fd, off_t block, size_t skip, const char *src, size_t n,
                 char *bounce, size_t align) noexcept nogil:
    """Write n bytes from src at block + skip, inside one aligned block,
    by read-modify-write through bounce."""
    cdef ssize_t got = pread_full(fd, bounce, align, block, align)
    if got < 0:
        return got
    if <size_t>got < align:
        # The block holds the end of file: writing it whole would grow the
        # file to a block boundary.
        return pwrite_buffered(fd, src, n, block + skip)
    sc.memcpy(bounce + skip, src, n)
    return pwrite_all(fd, bounce, align, block)


cdef ssize_t write_middle(int fd, const char *p, size_t n, off_t off,
                          char *bounce, size_t bounce_size,
                          size_t align) noexcept nogil:
    """Write n aligned bytes at aligned off from p (any address)."""
    cdef size_t step
    cdef ssize_t r
    if (<size_t>p) % align == 0:
        return pwrite_all(fd, p, n, off)
    step = bounce_size - bounce_size % align
    while n:
        step = min(step, n)
        sc.memcpy(bounce, p, step)
        r = pwrite_all(fd, bounce, step, off)
        if r < 0:
            return r
        p += step
        off += step
        n -= step
    return 0


cdef int write_data(int fd, const char *p, size_t n, off_t off,
                    AlignedBuffer bounce, size_t align, object lock) except -1:
    cdef ssize_t r = 0
    cdef off_t end = off + n
    cdef off_t block
    cdef size_t piece
    check_align(align)
    check_offset(off)
    if align <= 1:
        with nogil:
            r = pwrite_all(fd, p, n, off)
        if r < 0:
            raise_errno(r)
        return 0

    if bounce is None or bounce.size < align or bounce.align % align:
        raise ValueError("bounce must be an AlignedBuffer of at least one "
                         "block aligned to {}".format(align))

    # Unaligned head: read-modify-write of its block, under the caller's
    # lock so concurrent writers to the same block do not lose updates.
    if off % align and n:
        block = align_down(off, align)
        piece = min(end, block + <off_t>align) - off
        if lock is not None:
            lock.acquire()
        try:
            with nogil:
                r = rmw(fd, block, off - block, p, piece, bounce.data, align)
        finally:
            if lock is not None:
                lock.release()
        if r < 0:
            raise_errno(r)
        p += piece
        off += piece

    # Aligned middle.
    piece = align_down(end - off, align)
    if piece:
        with nogil:
            r = write_middle(fd, p, piece, off, bounce.data, bounce.size,
                             align)
        if r < 0:
            raise_errno(r)
        p += piece
        off += piece

    # Unaligned tail.
    if off < end:
        if lock is not None:
            lock.acquire()
        try:
            with nogil:
                r = rmw(fd, off, 0, p, end - off, bounce.data, align)
        finally:
            if lock is not None:
                lock.release()
        if r < 0:
            raise_errno(r)
    return 0


def readinto(int fd, AlignedBuffer buf not None, off_t offset, size_t length,
             size_t align):
    """Read ``length`` bytes at ``offset`` into ``buf``.

    With ``align`` > 1 (an O_DIRECT fd) reads the aligned superset of the
    range, which must fit in ``buf`` (``length + 2 * align <= len(buf)``
    always does).  Returns ``(start, count)``: the wanted bytes are
    ``buf[start:start + count]``; ``count < length`` only at end of file.
    Raises ValueError if the range does not fit, OSError on I/O errors.
    """
    cdef off_t first, end
    cdef size_t start, n
    cdef ssize_t got
    check_align(align)
    check_offset(offset)
    if align > 1:
        first = align_down(offset, align)
        end = align_up(offset + length, align)
        if buf.align % align:
            raise ValueError("buffer alignment {} is not a multiple of {}"
                             .format(buf.align, align))
    else:
        first = offset
        end = offset + length
    n = end - first
    start = offset - first
    if n > buf.size:
        raise ValueError(
            "Cannot read {} bytes at offset {} with alignment {} into a "
            "buffer of {} bytes".format(length, offset, align, buf.size))
    with nogil:
        got = pread_full(fd, buf.data, n, first, align)
    if got < 0:
        raise_errno(got)
    if <size_t>got <= start:
        return start, 0
    return start, min(length, got - start)


def write(int fd, data, off_t offset, AlignedBuffer bounce=None,
          size_t align=1, lock=None):
    """Write all of ``data`` (a contiguous bytes-like object) at ``offset``.

    With ``align`` > 1 (an O_DIRECT fd): the aligned middle goes straight
    from ``data`` when its address is aligned at that point, else through
    ``bounce`` (an AlignedBuffer of at least ``align`` bytes, not holding
    ``data``); an unaligned head or tail is read-modify-written through
    ``bounce`` while holding ``lock`` (optional, any object with
    acquire/release), so concurrent writers of neighbouring ranges sharing a
    block do not lose updates.  Retries short writes and EINTR.  Raises
    OSError.
    """
    cdef Py_buffer view
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        write_data(fd, <const char *>view.buf, view.len, offset, bounce,
                   align, lock)
    finally:
        PyBuffer_Release(&view)


def fallocate(int fd, int mode, off_t offset, off_t length):
    """fallocate(2) with the GIL released.  Raises OSError (EOPNOTSUPP when
    the file system does not support ``mode``)."""
    cdef int r
    with nogil:
        r = sc.fallocate(fd, mode, offset, length)
        if r < 0:
            r = -sc.errno
    if r < 0:
        raise_errno(r)


def fdatasync(int fd):
    """fdatasync(2) with the GIL released.  Raises OSError."""
    cdef int r
    with nogil:
        r = sc.fdatasync(fd)
        if r < 0:
            r = -sc.errno
    if r < 0:
        raise_errno(r)


cdef int range_ioctl(int fd, unsigned long request, uint64_t offset,
                     uint64_t length) except -1:
    cdef uint64_t r[2]
    cdef int rc
    r[0] = offset
    r[1] = length
    with nogil:
        rc = sc.ioctl(fd, request, r)
        if rc < 0:
            rc = -sc.errno
    if rc < 0:
        raise_errno(rc)
    return 0


def blkzeroout(int fd, uint64_t offset, uint64_t length):
    """Zero a range of a block device (BLKZEROOUT); offset and length must
    be multiples of the logical block size.  Raises OSError."""
    range_ioctl(fd, sc.BLKZEROOUT, offset, length)


def blkdiscard(int fd, uint64_t offset, uint64_t length):
    """Discard a range of a block device (BLKDISCARD).  The range does not
    necessarily read as zeroes afterwards.  Raises OSError."""
    range_ioctl(fd, sc.BLKDISCARD, offset, length)


def blkgetsize64(int fd):
    """Size of a block device in bytes.  Raises OSError."""
    cdef uint64_t size = 0
    cdef int rc
    rc = sc.ioctl(fd, sc.BLKGETSIZE64, &size)
    if rc < 0:
        raise_errno(-sc.errno)
    return size


def blksszget(int fd):
    """Logical block size of a block device in bytes.  Raises OSError."""
    cdef int size = 0
    cdef int rc
    rc = sc.ioctl(fd, sc.BLKSSZGET, &size)
    if rc < 0:
        raise_errno(-sc.errno)
    return size


def supports_direct(path):
    """Whether ``path`` can be opened with O_DIRECT."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == sc.EINVAL:
            return False
        raise
    os.close(fd)
    return True


# statfs(2) f_type of tmpfs.
TMPFS_MAGIC = 0x01021994


def fs_type(int fd):
    """The file system type (statfs(2) ``f_type``, e.g. TMPFS_MAGIC) of the
    file system holding ``fd``.  Raises OSError."""
    cdef sc.statfs st
    if sc.fstatfs(fd, &st) < 0:
        raise_errno(-sc.errno)
    return st.f_type
