"""The file backend: a regular file or a block device, as raw bytes.

Opened with O_DIRECT (no page cache pollution, no stale-cache surprises for
the VM that owns the disk) and falling back to buffered I/O where the file
system refuses it.  Bytes move in ``imageio._io``: ``sendfile`` or aligned
reads to plain sockets, ``recv`` then O_DIRECT ``pwrite`` from them, and
aligned reads/writes through the connection's buffer for TLS.
"""

import concurrent.futures
import errno
import logging
import os
import stat
import threading
import weakref

from .. import buffers
from .. import errors
from .._io import directio
from .._io import stream
from .._io.buffer import AlignedBuffer
from . import Extent, check_extents_range, parse_file_url

log = logging.getLogger("backends.file")

# O_DIRECT alignment: a multiple of every logical block size in use.
ALIGN = 4096

# Bounce buffer per backend: unaligned heads and tails, and aligned
# middles of data that is not aligned in memory.
BOUNCE_SIZE = 1024**2

# Transfers at least this long on O_DIRECT storage overlap storage I/O with
# the network: a worker thread reads the next chunk (or writes the last
# one) into a second buffer while this thread sends (or receives) the
# other.  Both sides release the GIL.  Only where there is I/O wait to
# hide: on memory-backed files (buffered, a memcpy) measured A/B with curl
# on 2 cores the handoffs cost ~0.05 s CPU/GiB and gained nothing.
PIPELINE_MIN = 2 * 1024**2

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
    path = parse_file_url(ticket.url)
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
    import fcntl
    fcntl.fcntl(fd, fcntl.F_SETFL,
                fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)


class FileBackend:
    """One open fd of a file or block device; see ``imageio.backends``."""

    features = frozenset({"extents", "zero", "flush"})
    max_readers = 8
    max_writers = 8

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
        self._spare_buffer = None
        self._pool = None
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

    # Bulk transfer.

    def _pipelined(self, length):
        return self._align > 1 and length >= PIPELINE_MIN

    def read_to(self, sink, offset, length, buf, progress):
        if sink.fd >= 0:
            # Plain socket: sendfile in C, no copy through user space.
            if self._align > 1:
                self._send_cached(sink, offset, length, buf, progress)
            else:
                self._send_file(sink, offset, length, buf, progress)
        elif self._pipelined(length) and self._spare(buf) is not None:
            self._read_pipelined(sink, offset, length, buf, progress)
        else:
            end = offset + length
            while offset < end:
                n = self._chunk(offset, end, len(buf))
                start, count = directio.readinto(self._fd, buf, offset, n,
                                                 self._align)
                self._check_read(offset, n, count)
                with memoryview(buf)[start:start + count] as view:
                    sink.write(view)
                offset += n
                progress(n)

    def _send_cached(self, sink, offset, length, buf, progress):
        """sendfile() from a second, buffered fd, dropping the pages once
        sent.

        On O_DIRECT storage this beats pread + send (measured A/B with curl
        over the unix socket, 1 GiB half-sparse image on ext4: ~2300 vs
        ~1800 MiB/s): the kernel reads ahead while we send, holes come
        from the zero page without touching the disk, and pages go to the
        socket without a copy.  POSIX_FADV_DONTNEED after each chunk keeps
        the host's page cache as O_DIRECT would; O_DIRECT writes to the
        same file invalidate cached pages, so reads stay coherent.
        """
        if self._read_fd == -1:
            self._read_fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
            os.posix_fadvise(self._read_fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        end = offset + length
        while offset < end:
            n = self._chunk(offset, end, len(buf))
            count = stream.send_file(sink.fd, self._read_fd, offset, n, buf,
                                     1, sink.timeout)
            self._check_read(offset, n, count)
            os.posix_fadvise(self._read_fd, offset, n,
                             os.POSIX_FADV_DONTNEED)
            offset += n
            progress(n)

    def _send_file(self, sink, offset, length, buf, progress):
        end = offset + length
        while offset < end:
            n = self._chunk(offset, end, len(buf))
            count = stream.send_file(sink.fd, self._fd, offset, n, buf,
                                     self._align, sink.timeout)
            self._check_read(offset, n, count)
            offset += n
            progress(n)

    def _read_pipelined(self, sink, offset, length, buf, progress):
        """Read chunk i+1 in the worker while chunk i is sent: from C to a
        plain socket, through OpenSSL (which releases the GIL) to TLS.
        Chunks inside a hole are not read: zeroes are sent from a shared
        zero buffer."""
        bufs = (buf, self._spare(buf))
        pool = self._worker()
        end = offset + length
        n = self._chunk(offset, end, len(buf))
        pending = pool.submit(self._read_chunk, bufs[0], offset, n)
        i = 0
        try:
            while pending is not None:
                start, count, hole = pending.result()
                pending = None
                self._check_read(offset, n, count)
                next_offset = offset + n
                if next_offset < end:
                    next_n = self._chunk(next_offset, end, len(buf))
                    pending = pool.submit(self._read_chunk, bufs[i ^ 1],
                                          next_offset, next_n)
                data = _zero_buffer(len(buf)) if hole else bufs[i]
                if sink.fd >= 0:
                    stream.send_from(sink.fd, data, start, count,
                                     sink.timeout)
                else:
                    with memoryview(data)[start:start + count] as view:
                        sink.write(view)
                progress(n)
                if pending is not None:
                    offset, n, i = next_offset, next_n, i ^ 1
        finally:
            # Never leave the worker filling a buffer we handed back.
            if pending is not None:
                concurrent.futures.wait([pending])

    def _read_chunk(self, buf, offset, length):
        """Read a chunk; return (start, count, hole).  A chunk inside a
        hole of a regular file is not read: (0, length, True)."""
        if not self._block and self._in_hole(offset, length):
            return 0, length, True
        start, count = directio.readinto(self._fd, buf, offset, length,
                                         self._align)
        return start, count, False

    def _in_hole(self, offset, length):
        try:
            data = os.lseek(self._fd, offset, os.SEEK_DATA)
        except OSError as e:
            # ENXIO: no data after offset.  Anything else: cannot tell.
            if e.errno != errno.ENXIO:
                return False
            # Past the end of file is not a hole: the read reports it.
            return offset + length <= self.size()
        return data >= offset + length

    def write_from(self, source, offset, length, buf, progress):
        if self._pipelined(length) and self._spare(buf) is not None:
            self._write_pipelined(source, offset, length, buf, progress)
            return
        fd = self._fd
        align = self._align
        end = offset + length
        done = 0
        while offset < end:
            n = self._chunk(offset, end, len(buf))
            sock = source.fd
            if sock >= 0:
                got = stream.recv_to_file(sock, fd, offset, n, buf,
                                          self._bounce, align, source.timeout,
                                          self._lock)
                source.consumed(got)
            else:
                # Same alignment in memory as in the file: only the head and
                # tail blocks go through the bounce buffer.
                skip = offset % align
                with memoryview(buf)[skip:skip + n] as view:
                    got = _read_full(source, view)
                    directio.write(fd, view[:got], offset, self._bounce,
                                   align, self._lock)
            done += got
            if got < n:
                raise errors.PartialContent(length, done)
            offset += n
            progress(n)

    def _write_pipelined(self, source, offset, length, buf, progress):
        """Receive chunk i+1 while the worker writes chunk i."""
        bufs = (buf, self._spare(buf))
        pool = self._worker()
        align = self._align
        end = offset + length
        pending = None
        pending_n = 0
        done = 0
        i = 0
        try:
            while offset < end:
                n = self._chunk(offset, end, len(buf))
                # Same alignment in memory as in the file: only the head
                # and tail blocks go through the bounce buffer.
                skip = offset % align
                view = memoryview(bufs[i])[skip:skip + n]
                sock = source.fd
                if sock >= 0:
                    # Plain socket: the receive loop runs in C.
                    got = stream.recv_into(sock, bufs[i], skip, n,
                                           source.timeout)
                    source.consumed(got)
                else:
                    got = _read_full(source, view)
                if pending is not None:
                    pending.result()
                    pending = None
                    done += pending_n
                    progress(pending_n)
                if got < n:
                    if got:
                        # What arrived is written; the error says how much.
                        directio.write(self._fd, view[:got], offset,
                                       self._bounce, align, self._lock)
                    raise errors.PartialContent(length, done + got)
                pending = pool.submit(directio.write, self._fd, view, offset,
                                      self._bounce, align, self._lock)
                pending_n = n
                offset += n
                i ^= 1
            if pending is not None:
                pending.result()
                pending = None
                progress(pending_n)
        finally:
            if pending is not None:
                concurrent.futures.wait([pending])

    def _worker(self):
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="file-io")
        return self._pool

    def _spare(self, buf):
        # A second buffer for pipelined transfers: the pool's spare for a
        # pooled buf (None when the daemon is busy: then transfers run
        # without overlap), else allocated once per backend.
        spare = buffers.spare_for(buf)
        if spare is not buffers.UNPOOLED:
            return spare
        if self._spare_buffer is None or len(self._spare_buffer) != len(buf):
            self._spare_buffer = AlignedBuffer(len(buf))
        return self._spare_buffer

    def readinto(self, buf, offset, length):
        start, count = directio.readinto(self._fd, buf, offset, length,
                                         self._align)
        self._check_read(offset, length, count)
        return memoryview(buf)[start:start + count]

    def _chunk(self, offset, end, bufsize):
        """Length of the next chunk at ``offset``: its aligned superset fits
        in the buffer, and chunks after the first start aligned."""
        align = self._align
        limit = offset - offset % align + bufsize - bufsize % align
        return min(end, limit) - offset

    def _check_read(self, offset, length, count):
        if count < length:
            raise errors.BackendError(
                "Short read from {}: {} bytes at offset {}, got {} (end of "
                "file at {})".format(self._path, length, offset, count,
                                     self.size()))

    # Zero and flush.

    def zero(self, offset, length, punch_hole):
        if length <= 0:
            return
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
                    self._write(b"\0", end - 1)
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
                self._write(view, offset)
            offset += n

    def _write(self, data, offset):
        directio.write(self._fd, data, offset, self._bounce, self._align,
                       self._lock)

    def flush(self):
        directio.fdatasync(self._fd)

    # Extents.

    def extents(self, offset=0, length=None, context="zero"):
        if context != "zero":
            raise errors.NotFound(
                "Extents context {!r} is not available for file {}".format(
                    context, self._path))
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

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._read_fd != -1:
            fd, self._read_fd = self._read_fd, -1
            os.close(fd)
        if self._fd != -1:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

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


def _read_full(source, view):
    """Read into view until full or end of stream; return the count."""
    done = 0
    n = len(view)
    while done < n:
        got = source.readinto(view[done:])
        if not got:
            break
        done += got
    return done
