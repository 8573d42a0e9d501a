"""A local image's data read and written in its file itself, where qemu
says it lies (or where the client laid it out), instead of through the
private qemu-nbd: ``DirectSource`` (an upload's source; a download's
read-back, through ``MappedImage``) and ``DirectTarget`` (a download's new
image, laid out by ``client.qcow2``).

A raw image's guest byte N is the file's byte N; a qcow2 image without
compression, encryption or an external data file stores each allocated
cluster's guest bytes as they are at a host offset ``qemu-img map`` tells.
The upload then sends them with sendfile (or, when the client hashes them,
one pread into its buffer): qemu-nbd's read, its send and the client's
receive (three copies of every byte, and qemu-nbd's CPU) are gone.  What
the map cannot place (a compressed cluster, a backing file's data, a
format other than raw and qcow2, a URL, a tar member) still comes through
qemu-nbd, which serves the same guest view.

``qemu-img map`` is read as it prints (a 1 TiB qcow2 holding 1 GiB maps in
0.2 s, faster than the same walk over NBD block status): its entries are
also the plan's extents, so the copy starts after the first lines.
"""

import array
import bisect
import json
import logging
import os
import stat
import subprocess
import threading

from .. import errors
from .. import extents
from .._io import stream
from ..backends.base import Backend
from ..backends.file import FileBackend
from . import qemu

log = logging.getLogger("client.direct")

# The formats whose map offsets are the source file's own bytes.
FORMATS = ("raw", "qcow2")


# Most runs placed (24 bytes each): a qcow2 written in random order can map
# to a run per 64 KiB cluster, 16 million for 1 TiB; past this many, the
# rest of the data comes through qemu-nbd.
MAX_RUNS = 1024**2


class MapError(errors.Error):
    """``qemu-img map`` failed or printed what it should not."""


class Runs:
    """Where guest bytes lie in a file: runs ``(start, length, host)`` in
    guest order (arrays: 24 bytes a run), looked up by bisection; safe to
    place, reset and look up from several threads."""

    def __init__(self, runs=(), limit=None):
        self._limit = limit
        self._lock = threading.Lock()
        self._starts = array.array("q")
        self._ends = array.array("q")
        self._hosts = array.array("q")
        for start, length, host in runs:
            self.place(start, length, host)

    def __len__(self):
        return len(self._starts)

    def place(self, start, length, host):
        """Add a run after the last one (merged with it when the file
        continues it); False, placing nothing, past ``limit`` runs."""
        with self._lock:
            if self._ends and self._ends[-1] == start and \
                    self._hosts[-1] + (start - self._starts[-1]) == host:
                self._ends[-1] = start + length
            elif self._limit is not None and \
                    len(self._starts) >= self._limit:
                return False
            else:
                self._starts.append(start)
                self._ends.append(start + length)
                self._hosts.append(host)
            return True

    def reset(self):
        with self._lock:
            for a in (self._starts, self._ends, self._hosts):
                del a[:]

    def pieces(self, offset, length):
        """``(guest, host, n)`` pieces of ``[offset, offset + length)``,
        or None when a byte of it has no place."""
        end = offset + length
        out = []
        with self._lock:
            i = bisect.bisect_right(self._starts, offset) - 1
            pos = offset
            while pos < end:
                if i < 0 or i >= len(self._starts) or \
                        not self._starts[i] <= pos < self._ends[i]:
                    return None
                n = min(end, self._ends[i]) - pos
                out.append((pos, self._hosts[i] + pos - self._starts[i], n))
                pos += n
                i += 1
        return out

    def covers(self, offset, length):
        return self.pieces(offset, length) is not None


def usable(filename, image, member=None):
    """Whether ``filename`` (``image``: its ``qemu.info``) can be read
    directly: a local file in raw or qcow2, the qcow2 neither encrypted
    nor with an external data file."""
    if member is not None or qemu.is_url(filename):
        return False
    fmt = image.get("format")
    if fmt not in FORMATS or image.get("encrypted"):
        return False
    if fmt == "qcow2":
        data = image.get("format-specific", {}).get("data", {})
        if data.get("data-file") or data.get("encrypt"):
            return False
    return os.path.isfile(filename) or _is_block(filename)


def _is_block(path):
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def map_argv(filename, fmt, backing_chain=True, force_share=False):
    """``qemu-img map`` of the guest view qemu-nbd serves (``qemu.serve``:
    a qcow2's backing file followed only when ``backing_chain``);
    ``force_share``: of an image a qemu-nbd holds open for writing."""
    argv = ["qemu-img", "map", "--output=json"]
    if force_share:
        argv.append("-U")
    if fmt == "qcow2" and not backing_chain:
        return argv + ["json:" + json.dumps({
            "driver": fmt, "backing": None,
            "file": {"driver": "file", "filename": filename}})]
    return argv + ["-f", fmt, filename]


class DirectSource(Backend):
    """The source file, addressed by guest offset through the runs the map
    placed (``covers()`` tells whether a range is wholly placed).  Shared
    by every worker: pread and sendfile take the offset, never the fd's
    position.  ``map()`` (a generator) runs ``qemu-img map`` and yields
    the plan's ``(start, length, zero)``, placing data runs as it goes: an
    item is planned, so placed, before a worker reads it."""

    name = "direct"

    def __init__(self, filename, fmt, size, backing_chain=True,
                 force_share=False):
        self._filename = filename
        self._argv = map_argv(filename, fmt, backing_chain, force_share)
        self._size = size
        self._fd = os.open(filename, os.O_RDONLY | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._runs = Runs(limit=MAX_RUNS)
        self._proc = None
        # Bytes placed by the map, and bytes the workers read here.
        self.placed = 0
        self.moved = 0

    def size(self):
        return self._size

    def extents(self, offset=0, length=None, context="zero"):
        raise NotImplementedError("DirectSource.map() gives the plan")

    def map(self, offset=0, length=None):
        """Yield the guest view's ``(start, length, zero)`` of ``[offset,
        offset + length)`` (None: to the end) from ``qemu-img map`` as it
        prints, placing data runs the file holds.  Ranges are mapped in
        increasing order.  MapError when qemu-img fails or its map does
        not cover the range."""
        end = self._size if length is None else offset + length
        if offset or end != self._size:
            argv = list(self._argv)
            argv[3:3] = ["--start-offset", str(offset),
                         "--max-length", str(end - offset)]
            proc = self._proc = self._spawn(argv)
        elif self._proc is not None:
            proc = self._proc  # start()ed.
        else:
            proc = self._proc = self._spawn(self._argv)
        pos = offset
        try:
            for line in proc.stdout:
                line = line.strip().lstrip("[").rstrip(",]").strip()
                if not line:
                    continue
                try:
                    e = json.loads(line)
                    start, length = int(e["start"]), int(e["length"])
                    zero, data = bool(e["zero"]), bool(e["data"])
                except (ValueError, KeyError, TypeError) as err:
                    raise MapError("qemu-img map printed {!r}: {}".format(
                        line[:200], err))
                if start != pos or length <= 0 or start + length > end:
                    raise MapError(
                        "qemu-img map: extent {}+{} where {} was expected"
                        .format(start, length, pos))
                if data and not zero and e.get("depth") == 0 and \
                        "offset" in e:
                    self._place(start, length, int(e["offset"]))
                pos = start + length
                yield start, length, zero
            err = proc.stderr.read()
            if proc.wait() != 0:
                raise MapError("qemu-img map failed: {}".format(
                    qemu._last_line(err) or proc.returncode))
            if pos != end:
                raise MapError("qemu-img map covered {} of {} bytes".format(
                    pos - offset, end - offset))
            log.debug("Mapped %s: %d bytes placed in the file",
                      self._filename, self.placed)
        finally:
            self._stop()

    def start(self):
        """Run the whole image's ``qemu-img map`` now, while the caller
        gets the rest ready (its start-up, ~10 ms, and the first extents
        then cost the copy nothing); ``map()`` reads it."""
        if self._proc is None:
            self._proc = self._spawn(self._argv)

    @staticmethod
    def _spawn(argv):
        try:
            return subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL, text=True,
                preexec_fn=qemu._die_with_parent)
        except FileNotFoundError:
            raise MapError("qemu-img is not installed (Debian: qemu-utils)")

    def _place(self, start, length, host):
        if self._runs.place(start, length, host):
            with self._lock:
                self.placed += length

    def reset(self):
        """Forget the runs placed so far (a read-back's next window: the
        last one's reads are done)."""
        self._runs.reset()

    def covers(self, offset, length):
        return self._runs.covers(offset, length)

    def readinto(self, buf, offset, length):
        runs = self._placed(offset, length)
        view = memoryview(buf)
        for guest, host, n in runs:
            self._pread(view[guest - offset:], guest, host, n)
        self._count(length)
        return view[:length]

    def _placed(self, offset, length):
        """The ``(guest, host, n)`` pieces of a range the workers read here
        (the plan gave them only placed items)."""
        runs = self._runs.pieces(offset, length)
        if runs is None:
            raise errors.Error("Bytes {}-{} of {} are not placed".format(
                offset, offset + length - 1, self._filename))
        return runs

    def _pread(self, buf, guest, host, n):
        """Read ``n`` bytes at ``host`` (guest offset ``guest``) into the
        start of ``buf``; return a view of them."""
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = os.preadv(self._fd, [view[got:n]], host + got)
            except OSError as e:
                raise self._failed(e, guest + got) from None
            if not k:
                raise self._short(guest + got)
            got += k
        return view[:n]

    # send_to(..., tap=) shows tap the bytes it sends (imageio.ops).
    taps_sent = True

    def send_to(self, fd, offset, length, buf, timeout, progress, tap=None):
        """sendfile the range to the socket ``fd``; with ``tap``, each
        chunk is first read into ``buf`` (one pread) for ``tap(offset,
        view)`` to see, and still sent by sendfile, without a copy: the
        client's hash costs one copy instead of two.  Should the file
        change between the two, the daemon's copy differs from what was
        hashed and the verification fails, as it must."""
        runs = self._placed(offset, length)
        step = len(buf)
        for guest, host, n in runs:
            done = 0
            while done < n:
                k = min(step, n - done)
                if tap is not None:
                    tap(guest + done,
                        self._pread(buf, guest + done, host + done, k))
                try:
                    sent = stream.send_file(fd, self._fd, host + done, k, buf,
                                            1, timeout)
                except (ConnectionError, TimeoutError):
                    raise  # The daemon's side: retried as a transport error.
                except OSError as e:
                    raise self._failed(e, guest + done) from None
                if sent < k:
                    raise self._short(guest + done + sent)
                done += k
                self._count(k)
                progress(k)

    def _count(self, n):
        with self._lock:
            self.moved += n

    def _failed(self, e, guest):
        return errors.Error("Cannot read {} at guest offset {}: {}".format(
            self._filename, guest, os.strerror(e.errno) if e.errno else e))

    def _short(self, guest):
        return errors.Error(
            "{} ended at guest offset {}: the source changed during the "
            "upload".format(self._filename, guest))

    def _stop(self):
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()

    def close(self):
        self._stop()
        if self._fd != -1:
            os.close(self._fd)
            self._fd = -1


class DirectTarget(Backend):
    """A download's new local image written at the host offsets of its
    layout (``runs``: ``(guest_start, length, host_offset)``, from
    ``client.qcow2.Layout`` or the identity of a raw file) with the
    daemon's file backend (buffered pwrite, writers of one file taking
    turns).  Shared by the workers."""

    name = "direct"

    def __init__(self, filename, size, runs):
        self._size = size
        self._runs = Runs(runs)
        fd = os.open(filename, os.O_RDWR | os.O_CLOEXEC)
        self._file = FileBackend(fd, filename, direct=False, writable=True)

    def size(self):
        return self._size

    def covers(self, offset, length):
        return self._runs.covers(offset, length)

    def write(self, data, offset):
        pieces = self._runs.pieces(offset, len(data))
        if pieces is None:
            raise errors.Error("Bytes {}-{} have no place in the local "
                               "image".format(offset, offset + len(data) - 1))
        with memoryview(data) as view:
            for guest, host, n in pieces:
                at = guest - offset
                self._file.write(view[at:at + n], host)

    def flush(self):
        self._file.flush()

    def close(self):
        self._file.close()


class MappedImage:
    """The read-back of a download's local image (client.verify.ReadBack's
    connection): after the window is flushed through qemu-nbd, ``qemu-img
    map -U`` of the window places its data in the file, read there with
    pread; what it cannot place is read through ``nbd`` (a clone of the
    private qemu-nbd's connection).  One ``DirectSource`` (``source``) is
    shared by the read-back's connections."""

    def __init__(self, source, nbd, flush=None):
        self._source = source
        self._nbd = nbd
        self._flush = flush or nbd.flush

    def flush(self):
        self._flush()

    def extents(self, offset, length, context="zero"):
        # A new window: the last one's reads are done (ReadBack).
        self._source.reset()
        # (The read-back asks only "zero"; hole is not told apart here.)
        return [extents.Extent(start, n, zero, zero)
                for start, n, zero in self._source.map(offset, length)]

    def readinto(self, buf, offset, length):
        if self._source.covers(offset, length):
            return self._source.readinto(buf, offset, length)
        return self._nbd.readinto(buf, offset, length)

    def close(self):
        self._nbd.close()
