"""Verification: the block hash of what the client moved (or of its local
image) compared with the daemon's hash of its copy, in the fastest
algorithm both offer.

As the transfer goes, window by window (``Windows``, ``WindowVerifier``):
an upload asks this project's daemon for the block hash of each written
window (flush, then ``/checksum?offset=&length=``, hashed next to the data:
``RemoteWindows``), or, with a daemon that hashes whole images only (the
established one), reads the window back (GETs) and compares its block
digests with the source's, fed as they moved, so a bad window fails the
upload while later ones would still be moving; a download reads each
written window back from the local image and compares the whole with the
daemon's checksum, computed while the data moves."""

import concurrent.futures
import logging
import threading

from .. import checksum as blkhash
from .. import errors
from .._io import stream as _stream
from .._io.buffer import AlignedBuffer
from . import direct

log = logging.getLogger("client")


class VerifyError(errors.Error):
    """The image the daemon holds differs from the local one."""


# The block hashes verification uses, the first the daemon offers (and
# this host has): XXH3-128 hashes 55 GB/s a core here (checksum.py says
# why a non-cryptographic 128-bit hash is the right tool for telling a
# copy from its source), BLAKE3 (SIMD) 6, SHA-256 with the SHA extensions
# of current CPUs 1.7, blake2b (the fallback every daemon has) 0.9.
VERIFY_ALGORITHMS = ("xxh3_128", "blake3", "sha256")


def algorithm(http, wanted=None):
    """The verification's algorithm: ``wanted`` (an error when the daemon
    or this host lacks it), else the first of VERIFY_ALGORITHMS both
    offer, else blake2b."""
    offered = http.checksum_algorithms()
    here = blkhash.algorithms()
    if wanted is not None:
        if wanted not in here:
            raise errors.Error("Unsupported checksum algorithm {!r}; "
                               "supported: {}".format(wanted,
                                                      ", ".join(here)))
        if offered and wanted not in offered:
            raise errors.Error(
                "The daemon does not offer checksum algorithm {!r}; it "
                "offers: {}".format(wanted, ", ".join(offered)))
        return wanted
    for name in VERIFY_ALGORITHMS:
        if name in offered and name in here:
            return name
    return blkhash.DEFAULT_ALGORITHM


def hasher(algorithm, size):
    """A block hasher fed while the data flows."""
    return blkhash.BlockHasher(size, algorithm, blkhash.DEFAULT_BLOCK_SIZE)


class RemoteChecksum:
    """The daemon's block hash in ``hasher``'s algorithm, asked for now on
    a connection of its own; ``result()`` waits for it, ``cancel()`` (a
    failed transfer) closes the connection instead of waiting for a hash
    that may take minutes."""

    def __init__(self, http, hasher):
        self._http = http.clone()
        self._future = concurrent.futures.Future()
        threading.Thread(target=self._run, args=(hasher,), daemon=True,
                         name="checksum").start()

    def _run(self, hasher):
        try:
            self._future.set_result(self._http.checksum(
                hasher.algorithm, hasher.block_size)["checksum"])
        except BaseException as e:
            self._future.set_exception(e)
        finally:
            self._http.close()

    def result(self):
        return self._future.result()

    def cancel(self):
        self._http.close()


class _Serialized:
    """An NBD backend whose reads and extents run one at a time."""

    def __init__(self, nbd):
        self._nbd = nbd
        self._lock = threading.Lock()
        self.features = nbd.features

    def readinto(self, buf, offset, length):
        with self._lock:
            return self._nbd.readinto(buf, offset, length)

    def extents(self, offset, length, context="zero"):
        with self._lock:
            return list(self._nbd.extents(offset, length, context))


def verify(nbd, http, size, algorithm, hasher=None, remote=None,
            serial=False):
    """Compare the local block hash with the daemon's, computed next to
    its data (``remote``: already asked for during a download; else asked
    now).  The local one is ``hasher``'s (fed while the data flowed);
    without it (a resumed transfer, an incremental download) the local image
    is hashed now, on all cores, while the daemon hashes its copy."""
    if hasher is not None:
        if remote is None:
            remote = http.checksum(hasher.algorithm,
                                   hasher.block_size)["checksum"]
        local = hasher.hexdigest()
    else:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            remote = pool.submit(http.checksum, algorithm,
                                 blkhash.DEFAULT_BLOCK_SIZE)
            if serial:
                local = blkhash.compute(_Serialized(nbd), size,
                                        algorithm=algorithm, workers=1)
            else:
                local = blkhash.compute(nbd, size, algorithm=algorithm)
            remote = remote.result()["checksum"]
    return compare(local, remote, algorithm)


def compare(local, remote, algorithm):
    """The verification's result: the local and the daemon's image
    digests equal, or VerifyError naming both."""
    if local != remote:
        raise VerifyError(
            "Verification failed: local image {} checksum {} differs from "
            "the daemon's {}".format(algorithm, local, remote))
    log.info("Verified: %s checksum %s", algorithm, local)
    return {"algorithm": algorithm, "checksum": local}


# Verification as the transfer goes: the image in windows, each checked
# once all its bytes moved, while the next ones move.  What is left after
# the copy is the last window's check: a window is a part of the image
# (WINDOW_PARTS), at least WINDOW_MIN, at most WINDOW_MAX.  An upload's
# check is a flush and one request: sixteenths leave less after the copy
# (2 GiB upload: 14-18 ms after the last byte against 32-47 with
# quarters).  A download's runs qemu-img map of the window (~10 ms of CPU
# each): quarters (sixteenths cost 0.25 CPU-s more on a 2 GiB download).
WINDOW_MAX = 1024**3
WINDOW_MIN = 64 * 1024**2
WINDOW_PARTS = 4
UPLOAD_WINDOW_PARTS = 16


def window_size(size, align, parts=WINDOW_PARTS):
    """The verification window of an image of ``size`` bytes, a multiple
    of ``align`` (the block size and the copy's request size: no item
    straddles two windows unless it covers whole windows)."""
    w = min(WINDOW_MAX, max(WINDOW_MIN, size // parts))
    return max(align, -(-w // align) * align)


class Windows:
    """The image's windows and the bytes each still waits for:
    ``moved(start, length)`` as the copy's items finish, ``wait(i)``
    until window ``i`` has moved whole (False: the copy stopped)."""

    def __init__(self, size, window):
        self.size = size
        self.window = window
        self.count = -(-size // window)
        self._left = [min(window, size - i * window)
                      for i in range(self.count)]
        self._cond = threading.Condition()
        self._stopped = False

    def bounds(self, index):
        start = index * self.window
        return start, min(start + self.window, self.size)

    def moved(self, start, length):
        end = start + length
        w = self.window
        with self._cond:
            for i in range(start // w, (end - 1) // w + 1):
                a, b = self.bounds(i)
                self._left[i] -= min(end, b) - max(start, a)
            self._cond.notify_all()

    def wait(self, index):
        with self._cond:
            while self._left[index] and not self._stopped:
                self._cond.wait()
            return not self._left[index]

    def ready(self, index):
        with self._cond:
            return not self._left[index]

    def stop(self):
        with self._cond:
            self._stopped = True
            self._cond.notify_all()


# Most windows checked at once when several are ready.
COALESCE = 64


class WindowVerifier:
    """Runs ``check(start, end)`` for each window of ``windows`` in order,
    on a thread of its own, as soon as the window has moved.  A failed
    check sets ``abort`` (the copy's stop event) and is raised by
    ``result()``; ``cancel()`` (a failed copy) stops at the next window."""

    def __init__(self, windows, check, abort):
        self._windows = windows
        self._check = check
        self._abort = abort
        self._error = None
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="verify")
        self._thread.start()

    def _run(self):
        windows = self._windows
        try:
            i = 0
            while i < windows.count:
                if not windows.wait(i):
                    return
                # Windows moved meanwhile are checked with this one: one
                # flush and one extents request (a huge sparse image
                # moves its empty windows at once).
                j = i + 1
                while j < windows.count and j - i < COALESCE and \
                        windows.ready(j):
                    j += 1
                self._check(windows.bounds(i)[0], windows.bounds(j - 1)[1])
                i = j
        except BaseException as e:
            self._error = e
            self._abort.set()

    def result(self):
        """After the copy: wait for the last window's check; raise its
        failure.  A window the copy left incomplete is not waited for
        (the block hash then says which block was never moved)."""
        self._windows.stop()
        self._thread.join()
        if self._error is not None:
            raise self._error

    def cancel(self):
        self._windows.stop()
        self._thread.join()


def compare_window(local, remote, start, end):
    """Compare the block digests of ``[start, end)`` in the BlockHashers
    ``local`` and ``remote``; raise VerifyError naming the first block
    that differs and both its digests."""
    mine = local.digests(start, end)
    theirs = remote.digests(start, end)
    if None in mine or None in theirs:
        raise errors.Error("Block hash incomplete in {}-{}".format(
            start, end - 1))
    if mine != theirs:
        i = next(i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b)
        first = start + i * local.block_size
        last = min(first + local.block_size, local.size) - 1
        raise VerifyError(
            "Verification failed: local image {} checksum {} of bytes "
            "{}-{} differs from the daemon's {}".format(
                local.algorithm, mine[i].hex(), first, last,
                theirs[i].hex()))


# The read-back of a window: jobs of this many bytes (whole blocks) on
# READBACK_LANES connections at once.  Two lanes: the tail left after the
# copy reads on both cores, and the read-back gets its share of the cores
# while the copy runs.
READBACK_JOB = 16 * 1024**2
READBACK_LANES = 2


class ReadBack:
    """``check(start, end)``: feed ``hasher`` the window ``[start, end)``
    read back from ``cons`` (connections to the same image: the daemon's,
    or the local image's), zero extents as zeroes, data read in jobs of
    whole blocks spread over the connections.  ``flush`` (if given) runs
    first: what is read back is what storage holds after the write."""

    def __init__(self, cons, hasher, extents=True, flush=None,
                 read=None):
        self._read = read or _read_image
        self._cons = cons
        self._hasher = hasher
        self._extents = extents
        self._flush = flush
        self._lanes = [(con, buffer()) for con in cons]
        self._free = list(self._lanes)
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            len(cons), thread_name_prefix="readback")

    def __call__(self, start, end):
        if self._flush is not None:
            self._flush()
        if self._extents:
            pieces = [(e.start, e.length, e.zero) for e in
                      self._cons[0].extents(start, end - start, "zero")]
        else:
            pieces = [(start, end - start, False)]
        step = max(self._hasher.block_size,
                   READBACK_JOB // self._hasher.block_size *
                   self._hasher.block_size)
        jobs = []
        i = 0
        a = start
        while a < end:
            off, n, zero = pieces[i]
            if zero and off + n - a >= step:
                # Whole jobs of a zero extent: cached digests, here (a
                # huge sparse image is mostly this).
                k = (min(end, off + n) - a) // step * step
                self._hasher.zero(a, k)
                a += k
                if off + n <= a:
                    i += 1
                continue
            b = min(end, a + step)
            job = []
            while i < len(pieces) and pieces[i][0] < b:
                off, n, zero = pieces[i]
                lo, hi = max(off, a), min(off + n, b)
                job.append((lo, hi - lo, zero))
                if off + n <= b:
                    i += 1
                else:
                    break
            jobs.append(self._pool.submit(self._job, job))
            a = b
        failure = None
        for f in jobs:
            try:
                f.result()
            except BaseException as e:
                failure = failure or e
        if failure is not None:
            raise failure

    def _job(self, pieces):
        if all(zero for _, _, zero in pieces):
            for off, n, _ in pieces:
                self._hasher.zero(off, n)
            return
        with self._lock:
            con, buf = self._free.pop()
        try:
            for off, n, zero in pieces:
                if zero:
                    self._hasher.zero(off, n)
                else:
                    self._read(con, buf, self._hasher, off, n)
        finally:
            with self._lock:
                self._free.append((con, buf))

    def close(self):
        self._pool.shutdown(wait=True)
        for con in self._cons:
            con.close()


def _read_image(con, buf, hasher, offset, length):
    """Feed ``hasher`` ``[offset, offset + length)`` of an NBD image,
    a buffer at a time."""
    step = len(buf) - blkhash.READ_SLACK
    stop = offset + length
    while offset < stop:
        k = min(step, stop - offset)
        hasher.data(offset, con.readinto(buf, offset, k))
        offset += k


def _read_http(con, buf, hasher, offset, length):
    """Feed ``hasher`` ``[offset, offset + length)`` of the daemon's image
    as one GET, received a buffer at a time in C (GIL released) on a plain
    socket, through Python over TLS."""
    def recv(source):
        step = len(buf) - blkhash.READ_SLACK
        view = memoryview(buf)
        pos, stop = offset, offset + length
        while pos < stop:
            n = min(step, stop - pos)
            got = 0
            while got < n:
                fd = source.fd
                if fd >= 0:
                    k = _stream.recv_into(fd, buf, got, n - got,
                                          source.timeout)
                    source.consumed(k)
                else:
                    k = source.readinto(view[got:n])
                if not k:
                    raise errors.PartialContent(length, pos - offset + got)
                got += k
            hasher.data(pos, view[:n])
            pos += n

    con.get_with(offset, length, recv)


def _clones(backend, n):
    cons = []
    try:
        for _ in range(n):
            cons.append(backend.clone())
    except BaseException:
        for con in cons:
            con.close()
        raise
    return cons


def buffer():
    return AlignedBuffer(blkhash.CHUNK + blkhash.READ_SLACK)


class RemoteWindows:
    """An upload's window check against a daemon that hashes windows
    (``checksum_windows()``: this project's): flush the daemon's copy,
    ask its block hash of the window, read back from its storage next to
    the data, and compare it with ``local``'s (the source's bytes, fed as
    they moved).  The daemon reads and hashes; nothing crosses the wire
    again."""

    def __init__(self, http, local):
        self._con = http.clone()
        self._local = local
        self._flush = "flush" in http.features or not http.features
        self._lock = threading.Lock()
        # The windows checked so far, in order: [0, checked).
        self.checked = 0

    def __call__(self, start, end):
        if self._flush:
            self._con.flush()
        local = self._local
        theirs = self._con.checksum(local.algorithm, local.block_size,
                                    start, end - start)
        if theirs.get("offset") != start:
            raise errors.Error("The daemon did not hash the window {}-{}"
                               .format(start, end - 1))
        mine = local.window_hexdigest(start, end)
        if mine != theirs["checksum"]:
            start, end, mine, theirs = self._first_bad_block(start, end)
            raise VerifyError(
                "Verification failed: local image {} checksum {} of bytes "
                "{}-{} differs from the daemon's {}".format(
                    local.algorithm, mine, start, end - 1, theirs))
        with self._lock:
            if start == self.checked:
                self.checked = end

    def _first_bad_block(self, start, end):
        """The first block of a window that differs (its range and both
        block hashes): the daemon hashes the window's blocks one by one
        until one differs (only when the window did)."""
        local = self._local
        bs = local.block_size
        for a in range(start, end, bs):
            b = min(a + bs, end)
            mine = local.window_hexdigest(a, b)
            theirs = self._con.checksum(local.algorithm, bs, a,
                                        b - a)["checksum"]
            if mine != theirs:
                return a, b, mine, theirs
        # Changed again since: the whole window is what differed.
        return start, end, local.window_hexdigest(start, end), "another"

    def result(self, size):
        """After the copy and the last window's check: the whole image
        verified (every window was), or the rest checked now."""
        local = self._local
        if self.checked < size:
            self(self.checked, size)
        checksum = local.hexdigest()
        log.info("Verified: %s checksum %s (window by window, hashed by "
                 "the daemon)", local.algorithm, checksum)
        return {"algorithm": local.algorithm, "checksum": checksum}

    def close(self):
        self._con.close()


def upload_check(http, local, size):
    """An upload's window check: with a daemon that hashes windows, ask
    its hash of each (``RemoteWindows``); else flush the daemon's copy,
    read the window back from its storage (GETs, on connections of their
    own), and compare its block hash with ``local``'s (the source's
    bytes, fed as they moved).  Returns ``(check, remote, close)``:
    ``remote`` is the RemoteWindows or the hasher of what was read
    back (see ``verified``)."""
    windows = getattr(http, "checksum_windows", None)
    if windows is not None and windows():
        remote = RemoteWindows(http, local)
        return remote, remote, remote.close
    remote = hasher(local.algorithm, size)
    cons = _clones(http, READBACK_LANES)
    can_extents = "extents" in http.features or not http.features
    can_flush = "flush" in http.features or not http.features
    readback = ReadBack(cons, remote, can_extents,
                        cons[0].flush if can_flush else None,
                        _read_http if hasattr(http, "get_with") else None)

    def check(start, end):
        readback(start, end)
        compare_window(local, remote, start, end)

    return check, remote, readback.close


def download_check(nbd, local, source=None, flush=None):
    """A download's window check: flush the local image, read the window
    back from it into ``local``: from the file where ``source`` (a
    client.direct.DirectSource of the local image) places it, else
    through qemu-nbd, on connections of their own; ``flush`` (default:
    qemu-nbd's) makes the window durable first.  The daemon's hash of
    its image is compared with ``local``'s at the end.  Returns ``(check,
    close)``."""
    cons = _clones(nbd, READBACK_LANES)
    if source is not None:
        cons = [direct.MappedImage(source, con, flush) for con in cons]
    readback = ReadBack(cons, local, True, cons[0].flush)
    return readback, readback.close


def verified(local, remote):
    """The result of a verification done window by window: the whole
    image's digests (equal when every window was)."""
    if isinstance(remote, RemoteWindows):
        return remote.result(local.size)
    return compare(local.hexdigest(), remote.hexdigest(), local.algorithm)
