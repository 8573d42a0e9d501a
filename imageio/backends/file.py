"""The file backend: a regular file or a block device, as raw bytes.

Opened with O_DIRECT (no page cache pollution, no stale-cache surprises for
the VM that owns the disk) and falling back to buffered I/O where the file
system refuses it.  Bytes move in ``imageio._io``: ``sendfile`` to plain
sockets (``send_to``), aligned reads and O_DIRECT writes of chunks
(``readinto``, ``write``) that ``imageio.ops`` moves to and from sockets.
"""

import errno
import fcntl
import logging
import os
import stat
import threading
import weakref

from .. import errors
from .._io import directio
from .._io import stream
from .._io.buffer import AlignedBuffer
from .. import urls
from ..extents import Extent, check_range as check_extents_range
from .base import Backend, IOFailed, io_error

log = logging.getLogger("backends.file")

# O_DIRECT alignment: a multiple of every logical block size in use.
ALIGN = 4096

# Bounce buffer per backend: unaligned heads and tails, and aligned
# middles of data that is not aligned in memory.
BOUNCE_SIZE = 1024**2

# Reads at least this long on O_DIRECT storage (the copy engine's chunks,
# not small ranged GETs) first ask whether they fall in a hole (one lseek),
# and then read nothing.
HOLE_CHECK_MIN = 256 * 1024

# Paths already logged as not supporting O_DIRECT (log once, not per
# connection).
_buffered_paths = set()

# Serializes read-modify-write of partial blocks between the backends (one
# per connection) of the same file: two clients writing neighbouring ranges
# that share a block must not lose each other's bytes.
_block_locks = weakref.WeakValueDictionary()
_block_locks_lock = threading.Lock()


class _BlockLock:
    __slots__ = ("_lock", "__weakref__")

    def __init__(self):
        self._lock = threading.Lock()

    def acquire(self):
        self._lock.acquire()

    def release(self):
        self._lock.release()


def _block_lock(st):
    key = (st.st_dev, st.st_ino, st.st_rdev)
    with _block_locks_lock:
        lock = _block_locks.get(key)
        if lock is None:
            lock = _block_locks[key] = _BlockLock()
        return lock


def open(ticket, cfg):
    """Open the file or block device of ``ticket`` (``file:///path``) for
    reading, or reading and writing when the ticket allows "write".

    Raises errors.BadRequest for a bad url, OSError when the path cannot be
    opened.
    """
    path = urls.parse_file_url(ticket.url)
    writable = "write" in ticket.ops
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_DIRECT)
        direct = True
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        fd = os.open(path, flags)
        direct = False
        if path not in _buffered_paths:
            _buffered_paths.add(path)
            log.info("O_DIRECT not supported for %s, using buffered I/O",
                     path)
    else:
        if _in_memory(fd):
            # On tmpfs the page cache is the storage: O_DIRECT still copies
            # through it and buys nothing, while buffered I/O lets
            # sendfile() pass pages (and holes as the zero page) to the
            # socket without copying: ~1.4x the throughput at half the CPU.
            _clear_direct(fd)
            direct = False
    try:
        return FileBackend(fd, path, direct=direct, writable=writable)
    except BaseException:
        os.close(fd)
        raise


def _in_memory(fd):
    # Only regular files: a block device node on devtmpfs is still a disk.
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        return False
    try:
        return directio.fs_type(fd) == directio.TMPFS_MAGIC
    except OSError:
        return False


def _clear_direct(fd):
    fcntl.fcntl(fd, fcntl.F_SETFL,
                fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)


class FileBackend(Backend):
    """One open fd of a file or block device; see ``imageio.backends``."""

    name = "file"
    features = frozenset({"extents", "zero", "flush"})
    max_readers = 8
    max_writers = 8
    # Clones are fds of one file: fdatasync on any covers every write, and
    # _block_lock serializes partial blocks between them.
    shared_clones = True

    def __init__(self, fd, path, direct=True, writable=True):
        st = os.fstat(fd)
        self._fd = fd
        self._path = path
        self._writable = writable
        self._align = ALIGN if direct else 1
        self._block = stat.S_ISBLK(st.st_mode)
        self._device_size = directio.blkgetsize64(fd) if self._block else None
        self._lock = _block_lock(st)
        self._bounce_buffer = None
        self._zeroes = None
        self._read_fd = -1
        log.debug("Opened %s direct=%s writable=%s block_device=%s",
                  path, direct, writable, self._block)

    @property
    def _bounce(self):
        # Allocated on first write: read-only backends never need it.
        if self._bounce_buffer is None:
            self._bounce_buffer = AlignedBuffer(BOUNCE_SIZE)
        return self._bounce_buffer

    @property
    def direct(self):
        """Whether the fd uses O_DIRECT."""
        return self._align > 1

    def size(self):
        if self._block:
            return self._device_size
        return os.fstat(self._fd).st_size

    @property
    def overlap(self):
        # Overlap storage I/O with the network only where there is I/O
        # wait to hide: on memory-backed files (buffered, a memcpy)
        # measured A/B with curl on 2 cores the handoffs cost ~0.05 s
        # CPU/GiB and gained nothing.
        return self._align > 1

    # Bulk transfer: primitives for imageio.ops.

    def send_to(self, fd, offset, length, buf, timeout, progress):
        """Send the range to the plain socket ``fd`` with sendfile(2), in
        C, reporting each buffer-sized chunk.

        On O_DIRECT storage from a second, buffered fd, dropping the pages
        once sent.  This beats pread + send (measured A/B with curl over
        the unix socket, 1 GiB half-sparse image on ext4: ~2300 vs ~1800
        MiB/s): the kernel reads ahead while we send, holes come from the
        zero page without touching the disk, and pages go to the socket
        without a copy.  POSIX_FADV_DONTNEED after each chunk keeps the
        host's page cache as O_DIRECT would; O_DIRECT writes to the same
        file invalidate cached pages, so reads stay coherent.
        """
        cached = self._align > 1
        src = self._cached_fd() if cached else self._fd
        end = offset + length
        while offset < end:
            n = self._chunk(offset, end, len(buf))
            try:
                count = stream.send_file(fd, src, offset, n, buf, 1, timeout)
            except (ConnectionError, TimeoutError):
                raise  # The client's side: nothing to say about the image.
            except OSError as e:
                raise self._failed(e, "read", offset, n) from None
            self._check_read(offset, n, count)
            if cached:
                os.posix_fadvise(src, offset, n, os.POSIX_FADV_DONTNEED)
            offset += n
            progress(n)

    def _cached_fd(self):
        if self._read_fd == -1:
            self._read_fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
            os.posix_fadvise(self._read_fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return self._read_fd

    def readinto(self, buf, offset, length):
        if length >= HOLE_CHECK_MIN and self._align > 1 and \
                not self._block and self._in_hole(offset, length):
            # Inside a hole: zeroes from a shared buffer, the disk untouched.
            return memoryview(_zero_buffer(length)).toreadonly()[:length]
        try:
            start, count = directio.readinto(self._fd, buf, offset, length,
                                             self._align)
        except OSError as e:
            raise self._failed(e, "read", offset, length) from None
        self._check_read(offset, length, count)
        return memoryview(buf)[start:start + count]

    def leading_hole(self, offset, length):
        # One SEEK_DATA, never SEEK_HOLE: on tmpfs SEEK_HOLE walks every
        # page up to the next hole, the whole file when it is all data
        # (measured: a 1 GiB NBD read took 22 s asking it per request).
        if self._block or length <= 0:
            return 0
        try:
            data = os.lseek(self._fd, offset, os.SEEK_DATA)
        except OSError as e:
            # ENXIO: no data after offset (but past the end of file is not
            # a hole: the read reports it).  Anything else: cannot tell.
            if e.errno != errno.ENXIO:
                return 0
            return length if offset + length <= self.size() else 0
        return min(data - offset, length)

    def _in_hole(self, offset, length):
        return self.leading_hole(offset, length) >= length

    def write(self, data, offset):
        # Buffered writes to a file take its inode lock in the kernel, one
        # at a time whatever we do; the kernel's waiters spin on a core
        # while the holder copies (perf of a 4-connection upload to tmpfs:
        # 5-6% of all CPU in rwsem_spin_on_owner).  Waiting on the file's
        # lock here sleeps instead.  O_DIRECT writes run at once.
        serial = self._align == 1 and not self._block
        if serial:
            self._lock.acquire()
        try:
            directio.write(self._fd, data, offset, self._bounce,
                           self._align, self._lock)
        except OSError as e:
            raise self._failed(e, "write", offset, len(data)) from None
        finally:
            if serial:
                self._lock.release()

    def _failed(self, e, op, offset, length):
        """Log ``e`` with the image's path; return the OSError the
        client is told (io_error: no path)."""
        if isinstance(e, IOFailed):
            return e  # Named and logged already.
        error = io_error(e, op, offset, length)
        log.warning("%s: %s", self._path, error.strerror)
        return error

    def _chunk(self, offset, end, bufsize):
        """Length of the next chunk at ``offset``: its aligned superset fits
        in the buffer, and chunks after the first start aligned."""
        align = self._align
        limit = offset - offset % align + bufsize - bufsize % align
        return min(end, limit) - offset

    def _check_read(self, offset, length, count):
        if count < length:
            # The client is not told where the image lives; the log is.
            message = ("Short read: {} bytes at offset {}, got {} (end of "
                       "image at {})".format(length, offset, count,
                                             self.size()))
            log.warning("%s: %s", self._path, message)
            raise errors.BackendError(message)

    # Zero and flush.

    def zero(self, offset, length, punch_hole):
        if length <= 0:
            return
        try:
            self._zero(offset, length, punch_hole)
        except OSError as e:
            raise self._failed(e, "zero", offset, length) from None

    def _zero(self, offset, length, punch_hole):
        # An unaligned head or tail is written as zeroes through the
        # partial-block lock that writes take: fallocate on part of a
        # block, between another writer's read and write of that block,
        # would be undone by it while both report success.  Whole blocks
        # are zeroed with fallocate (or the ioctls).
        end = offset + length
        first = min(end, -(-offset // ALIGN) * ALIGN)
        last = max(first, end - end % ALIGN)
        if first > offset:
            self._write_zeroes(offset, first - offset)
        if last > first:
            if self._block:
                self._zero_block_device(first, last - first, punch_hole)
            else:
                self._zero_file(first, last - first, punch_hole)
        if end > last:
            self._write_zeroes(last, end - last)

    def _zero_file(self, offset, length, punch_hole):
        end = offset + length
        if punch_hole:
            try:
                directio.fallocate(
                    self._fd,
                    directio.FALLOC_FL_PUNCH_HOLE |
                    directio.FALLOC_FL_KEEP_SIZE,
                    offset, length)
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
            else:
                # A hole punched past end of file does not grow it; one
                # written byte does, leaving the rest a hole.
                if os.fstat(self._fd).st_size < end:
                    self.write(b"\0", end - 1)
                return
        # Allocated zeroes: ZERO_RANGE grows the file when needed.
        try:
            directio.fallocate(self._fd, directio.FALLOC_FL_ZERO_RANGE,
                               offset, length)
            return
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise
        # Next best (tmpfs, NFS 4.2), as qemu does: punch a hole, then
        # allocate it again.
        try:
            directio.fallocate(
                self._fd,
                directio.FALLOC_FL_PUNCH_HOLE | directio.FALLOC_FL_KEEP_SIZE,
                offset, length)
            directio.fallocate(self._fd, 0, offset, length)
            return
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise
        self._write_zeroes(offset, length)

    def _zero_block_device(self, offset, length, punch_hole):
        # Whole logical blocks (zero() wrote the unaligned parts).
        # fallocate on a block device guarantees zeroes: PUNCH_HOLE unmaps
        # only where the device reads unmapped blocks as zero; ZERO_RANGE
        # keeps blocks allocated.  BLKDISCARD guarantees nothing, so it is
        # never used to zero.
        mode = directio.FALLOC_FL_KEEP_SIZE | (
            directio.FALLOC_FL_PUNCH_HOLE if punch_hole
            else directio.FALLOC_FL_ZERO_RANGE)
        try:
            directio.fallocate(self._fd, mode, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENODEV):
                raise
            directio.blkzeroout(self._fd, offset, length)

    def _write_zeroes(self, offset, length):
        if self._zeroes is None:
            self._zeroes = AlignedBuffer(BOUNCE_SIZE)
        end = offset + length
        while offset < end:
            # Aligned steps after the first keep writes direct.
            n = min(end, offset - offset % ALIGN + BOUNCE_SIZE) - offset
            with memoryview(self._zeroes)[:n] as view:
                self.write(view, offset)
            offset += n

    def flush(self):
        try:
            directio.fdatasync(self._fd)
        except OSError as e:
            raise self._failed(e, "flush", 0, self.size()) from None

    # Extents.

    def extents(self, offset=0, length=None, context="zero"):
        if context != "zero":
            raise errors.NotFound(
                "Extents context {!r} is not available for a file".format(
                    context))
        size = self.size()
        end = check_extents_range(offset, length, size)
        if self._block:
            return [Extent(offset, end - offset, False, False)] \
                if end > offset else []
        result = []
        for start, n, zero in self._holes_and_data(offset, end):
            if result and result[-1].zero == zero:
                last = result.pop()
                start, n = last.start, last.length + n
            result.append(Extent(start, n, zero, False))
        return result

    def _holes_and_data(self, pos, end):
        """(start, length, zero) covering [pos, end), from SEEK_DATA and
        SEEK_HOLE: the walk starts at ``pos``, whatever lies before it."""
        fd = self._fd
        first = pos
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    # No data after pos: the rest is a hole.
                    data = end
                elif e.errno == errno.EINVAL and pos == first:
                    # The file system cannot tell: all data.
                    yield pos, end - pos, False
                    return
                else:
                    raise
            data = min(data, end)
            if data > pos:
                yield pos, data - pos, True
            if data >= end:
                return
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            yield data, hole - data, False
            pos = hole

    def clone(self):
        """Another fd of the same file, with the same flags (O_DIRECT or
        not, read-only or not)."""
        fd = os.open("/proc/self/fd/{}".format(self._fd),
                     fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_CREAT
                     | os.O_CLOEXEC)
        try:
            return FileBackend(fd, self._path, direct=self.direct,
                               writable=self._writable)
        except BaseException:
            os.close(fd)
            raise

    def close(self):
        if self._read_fd != -1:
            fd, self._read_fd = self._read_fd, -1
            os.close(fd)
        if self._fd != -1:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __repr__(self):
        return "<FileBackend {} direct={} fd={}>".format(
            self._path, self.direct, self._fd)


_zeros = None
_zeros_lock = threading.Lock()


def _zero_buffer(size):
    """A shared, never written, zero-filled buffer of at least ``size``
    bytes."""
    global _zeros
    with _zeros_lock:
        if _zeros is None or len(_zeros) < size:
            _zeros = AlignedBuffer(size)
            memoryview(_zeros)[:] = bytes(size)
        return _zeros

