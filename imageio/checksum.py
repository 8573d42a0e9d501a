"""Block hash of an image (SPEC section 5).

Split the image into ``block_size`` blocks (the last may be shorter); each
block's digest is H(block); the image digest is H over the concatenated
block digests.  The result is the same as hashing every byte, but:

- zero extents are never read: their bytes are hashed from a static zero
  buffer, and a block that is all zero reuses one digest per length;
- the zero prefix of a block (common in sparse images: one small data
  cluster somewhere in a block) costs nothing: the hash state after N zero
  bytes is computed once and copied;
- blocks are hashed on all cores: hashlib releases the GIL while hashing,
  and each worker reads its own block into its own buffer.
"""

import bisect
import collections
import concurrent.futures
import hashlib
import os
import threading

from . import errors
from . import extents

try:
    # BLAKE3: SIMD, 6 GB/s a core here (sha256 with SHA extensions 1.7,
    # blake2b 0.9).  Offered when installed; the block hash construction
    # is the same for every algorithm.
    import blake3 as _blake3
except ImportError:  # pragma: no cover - a dependency, but optional here
    _blake3 = None

try:
    # XXH3-128 (the ``xxhash`` package): a 128-bit non-cryptographic hash,
    # 55 GB/s a core here on data in cache, what verification uses: it
    # tells any accidental difference (a lost or torn write, a wrong
    # block) with a 2**-128 chance of a collision, and a transfer's
    # verification has no adversary a cryptographic hash would stop (the
    # daemon that could forge an answer holds the bytes anyway).
    import xxhash as _xxhash
except ImportError:  # pragma: no cover - a dependency, but optional here
    _xxhash = None

DEFAULT_ALGORITHM = "blake2b"
DEFAULT_BLOCK_SIZE = 4 * 1024**2
MIN_BLOCK_SIZE = 1024**2
MAX_BLOCK_SIZE = 16 * 1024**2

# Bytes read per backend call, and the granularity of cached zero-prefix
# hash states.
CHUNK = 4 * 1024**2
ZERO_STEP = 64 * 1024

_ZEROS = memoryview(bytes(CHUNK))


def algorithms():
    """Algorithms with a fixed digest size that hashlib always has, and
    blake3 and xxh3_128 when their packages are installed."""
    names = {a for a in hashlib.algorithms_guaranteed
             if not a.startswith("shake_")}
    if _blake3 is not None:
        names.add("blake3")
    if _xxhash is not None:
        names.add("xxh3_128")
    return sorted(names)


def new_hash(algorithm):
    if algorithm not in algorithms():
        raise errors.BadRequest(
            "Unsupported checksum algorithm {!r}; supported: {}".format(
                algorithm, ", ".join(algorithms())))
    if algorithm == "blake2b":
        # Compatible with the established service: 32-byte blake2b.
        return hashlib.blake2b(digest_size=32)
    if algorithm == "blake3":
        # One thread a hash: blocks are hashed on all cores already.
        return _blake3.blake3()
    if algorithm == "xxh3_128":
        return _xxhash.xxh3_128()
    return hashlib.new(algorithm)


def validate_block_size(block_size):
    if not (MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE) or \
            block_size % 4096:
        raise errors.BadRequest(
            "Invalid block_size {}: expected a multiple of 4096 between {} "
            "and {}".format(block_size, MIN_BLOCK_SIZE, MAX_BLOCK_SIZE))


def _hash_zeros(h, length):
    while length:
        n = min(length, len(_ZEROS))
        h.update(_ZEROS[:n])
        length -= n


class _ZeroStates:
    """Hash states after N zero bytes (N a multiple of ZERO_STEP), and
    digests of all-zero blocks, computed once per request."""

    def __init__(self, algorithm):
        self._algorithm = algorithm
        self._lock = threading.Lock()
        self._states = {0: new_hash(algorithm)}
        self._digests = {}

    def state(self, length):
        """A new hash object that has hashed ``length`` zero bytes."""
        step = length - length % ZERO_STEP
        with self._lock:
            h = self._states.get(step)
            if h is None:
                # Extend from the longest cached prefix below.
                base = max(k for k in self._states if k <= step)
                h = self._states[base].copy()
                for k in range(base + ZERO_STEP, step + 1, ZERO_STEP):
                    _hash_zeros(h, ZERO_STEP)
                    self._states[k] = h.copy()
            h = h.copy()
        _hash_zeros(h, length - step)
        return h

    def digest(self, length):
        with self._lock:
            d = self._digests.get(length)
        if d is None:
            h = new_hash(self._algorithm)
            _hash_zeros(h, length)
            d = h.digest()
            with self._lock:
                self._digests[length] = d
        return d


class _ZeroMap:
    """Zero extents of ``[start, end)`` of the image (one window: the
    whole image's map of a huge sparse disk would be held for the whole
    request), for asking which parts of a block are zero."""

    def __init__(self, backend, start, end):
        self._starts = []
        self._ends = []
        try:
            found = list(extents.pieces(backend, start, end - start))
        except errors.Error:
            return
        for pos, length, zero in found:
            if not zero:
                continue
            if self._ends and self._ends[-1] == pos:
                self._ends[-1] = pos + length
            else:
                self._starts.append(pos)
                self._ends.append(pos + length)

    def zero_until(self, pos):
        """The end of the zero extent holding ``pos`` (``pos`` when it is
        in data)."""
        i = bisect.bisect_right(self._starts, pos) - 1
        if i >= 0 and self._ends[i] > pos:
            return self._ends[i]
        return pos

    def pieces(self, start, end):
        """Split [start, end) into (offset, length, zero) pieces."""
        out = []
        pos = start
        i = bisect.bisect_right(self._starts, pos) - 1
        if i < 0:
            i = 0
        while pos < end:
            while i < len(self._starts) and self._ends[i] <= pos:
                i += 1
            if i < len(self._starts) and self._starts[i] <= pos:
                stop = min(end, self._ends[i])
                out.append((pos, stop - pos, True))
            else:
                stop = end
                if i < len(self._starts):
                    stop = min(end, self._starts[i])
                out.append((pos, stop - pos, False))
            pos = stop
        return out


# Most block results kept waiting for an earlier block to finish.
MAX_PENDING = 65536

# The zero map is asked for this much of the image at a time.
ZERO_MAP_WINDOW = 1024**3

# Room a read needs beyond its length (unaligned head and tail with
# O_DIRECT: imageio._io.directio).
READ_SLACK = 8192


def _own_buffers():
    """Each hashing thread's own buffer, kept for the thread's life (the
    client's default: one process, one checksum)."""
    from ._io.buffer import AlignedBuffer
    local = threading.local()

    def lease():
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = AlignedBuffer(CHUNK + READ_SLACK)
        return buf, lambda: None

    return lease


def check_window(size, block_size, offset, length):
    """The end of the window ``[offset, offset + length)`` of an image of
    ``size`` bytes whose block hash a client may ask for: whole blocks
    (the image's last one may be short).  BadRequest otherwise."""
    end = offset + length
    if offset % block_size or offset > size or end < offset or \
            end > size or (end % block_size and end != size):
        raise errors.BadRequest(
            "Invalid checksum window offset={} length={}: whole blocks of "
            "{} bytes within the image's {} bytes expected".format(
                offset, length, block_size, size))
    return end


def compute(backend, size, algorithm=DEFAULT_ALGORITHM,
            block_size=DEFAULT_BLOCK_SIZE, progress=None, workers=None,
            executor=None, buffers=None, offset=0):
    """Return the block hash of ``[offset, size)`` of ``backend`` as a hex
    string: the whole image with ``offset`` 0, else the hash of the block
    digests of a window starting at a block boundary (``check_window``).
    ``progress(n)`` is called per block in order (it may raise Canceled,
    which stops the computation).

    Blocks are hashed by ``workers`` threads of their own, or on
    ``executor`` (the daemon's, shared by every checksum request so that
    concurrent ones share the cores instead of each starting a thread per
    core).  ``buffers()`` returns ``(buffer, release)`` for a block's
    reads (the daemon's bounded pool); by default each thread has its
    own.
    """
    validate_block_size(block_size)
    new_hash(algorithm)
    if executor is not None:
        workers = executor._max_workers
        own = None
    else:
        workers = workers or os.cpu_count() or 1
        own = executor = concurrent.futures.ThreadPoolExecutor(workers)
    if buffers is None:
        buffers = _own_buffers()
    zeros = _ZeroStates(algorithm)
    window = max(block_size, ZERO_MAP_WINDOW // block_size * block_size)

    def hash_block(zmap, start, length):
        pieces = zmap.pieces(start, start + length)
        if len(pieces) == 1 and pieces[0][2]:
            return zeros.digest(length)
        # A zero prefix costs nothing.
        if pieces[0][2]:
            h = zeros.state(pieces[0][1])
            pieces = pieces[1:]
        else:
            h = new_hash(algorithm)
        buf, release = buffers()
        try:
            step = len(buf) - READ_SLACK
            for offset, n, zero in pieces:
                if zero:
                    _hash_zeros(h, n)
                    continue
                end = offset + n
                while offset < end:
                    k = min(step, end - offset)
                    h.update(backend.readinto(buf, offset, k))
                    offset += k
        finally:
            release()
        return h.digest()

    outer = new_hash(algorithm)
    # Blocks in order: (length, digest or future).  Zero blocks are hashed
    # here at once (cached states), so only blocks that read data count
    # against the bound: on a sparse image the workers stay busy instead
    # of waiting behind a window full of zero blocks.
    pending = collections.deque()
    reading = 0

    def finish_one():
        nonlocal reading
        length, r = pending.popleft()
        if isinstance(r, concurrent.futures.Future):
            reading -= 1
            r = r.result()
        outer.update(r)
        if progress:
            progress(length)

    try:
        zmap = None
        zmap_end = start = offset
        while start < size:
            length = min(block_size, size - start)
            if start >= zmap_end:
                zmap_end = min(start - start % window + window, size)
                zmap = _ZeroMap(backend, start, zmap_end)
            run = (min(zmap.zero_until(start), zmap_end) - start) \
                // block_size
            if run > 1:
                # Whole zero blocks: their digests as one entry, in order,
                # not a loop turn each (262,144 of them in an empty 1 TiB).
                pending.append((run * block_size,
                                zeros.digest(block_size) * run))
                start += run * block_size
                continue
            pieces = zmap.pieces(start, start + length)
            if len(pieces) == 1 and pieces[0][2]:
                pending.append((length, zeros.digest(length)))
            else:
                pending.append((length, executor.submit(
                    hash_block, zmap, start, length)))
                reading += 1
            # Bounded in flight: a few reading blocks per worker, and
            # a bounded list of finished ones waiting for their turn.
            while reading >= 2 * workers or len(pending) >= MAX_PENDING:
                finish_one()
            start += block_size
        while pending:
            finish_one()
    except BaseException:
        running = [r for _, r in pending
                   if isinstance(r, concurrent.futures.Future)
                   and not r.cancel()]
        # None may touch the backend after we return (the caller closes
        # it).
        concurrent.futures.wait(running)
        raise
    finally:
        if own is not None:
            own.shutdown(wait=True)
    return outer.hexdigest()


class BlockHasher:
    """The block hash of an image computed from its bytes as a transfer
    moves them (the client's verification, computed while the data flows).

    ``data(offset, view)`` and ``zero(offset, length)`` feed pieces; every
    block must be fed from its start to its end in order (several blocks
    may be fed by several threads at once, one block by one thread at a
    time).  ``checkpoint(offset)`` / ``restore(mark, end)`` take back what
    a failed request fed, so its retry can feed it again.  ``hexdigest()``
    is the same digest ``compute`` gives for the same image, and raises
    errors.Error if a byte was never fed.
    """

    def __init__(self, size, algorithm=DEFAULT_ALGORITHM,
                 block_size=DEFAULT_BLOCK_SIZE):
        validate_block_size(block_size)
        new_hash(algorithm)
        self.size = size
        self.algorithm = algorithm
        self.block_size = block_size
        self._zeros = _ZeroStates(algorithm)
        self._lock = threading.Lock()
        # Block index -> [hash object, next offset] while it is fed.
        self._open = {}
        self._digests = [None] * (-(-size // block_size))

    def _bounds(self, index):
        start = index * self.block_size
        return start, min(start + self.block_size, self.size)

    def _state(self, offset):
        """The open state of the block holding ``offset``, which must be
        the block's next byte; None when ``offset`` starts the block."""
        index = offset // self.block_size
        with self._lock:
            st = self._open.get(index)
        start, _ = self._bounds(index)
        if st is None and offset != start or st is not None and \
                st[1] != offset or self._digests[index] is not None:
            raise RuntimeError("Block hash fed out of order at {}".format(
                offset))
        return index, st

    def _put(self, index, st, end):
        _, block_end = self._bounds(index)
        with self._lock:
            if end == block_end:
                self._open.pop(index, None)
                self._digests[index] = st[0].digest()
            else:
                st[1] = end
                self._open[index] = st

    def data(self, offset, view):
        """Feed the bytes ``view`` found at ``offset``."""
        with memoryview(view) as view:
            view = view.cast("B")
            pos, end = offset, offset + len(view)
            while pos < end:
                index, st = self._state(pos)
                _, block_end = self._bounds(index)
                n = min(end, block_end) - pos
                if st is None:
                    st = [new_hash(self.algorithm), pos]
                st[0].update(view[pos - offset:pos - offset + n])
                self._put(index, st, pos + n)
                pos += n

    def zero(self, offset, length):
        """Feed ``length`` zero bytes at ``offset`` (whole zero blocks
        cost one cached digest each)."""
        pos, end = offset, offset + length
        while pos < end:
            index, st = self._state(pos)
            block_start, block_end = self._bounds(index)
            n = min(end, block_end) - pos
            whole = (end - pos) // self.block_size
            if st is None and whole > 1:
                # A run of whole blocks: one digest, set at once (a 1 TiB
                # sparse image is 262,144 blocks).
                d = self._zeros.digest(self.block_size)
                with self._lock:
                    run = self._digests[index:index + whole]
                    if run.count(None) != whole or any(
                            index <= i < index + whole for i in self._open):
                        raise RuntimeError(
                            "Block hash fed out of order at {}".format(pos))
                    self._digests[index:index + whole] = [d] * whole
                pos += whole * self.block_size
                continue
            if st is None and n == block_end - block_start:
                with self._lock:
                    self._digests[index] = self._zeros.digest(n)
            else:
                if st is None:
                    st = [self._zeros.state(n), pos]
                else:
                    _hash_zeros(st[0], n)
                self._put(index, st, pos + n)
            pos += n

    def checkpoint(self, offset):
        """A mark to ``restore`` what is fed from ``offset`` on."""
        index = offset // self.block_size
        with self._lock:
            st = self._open.get(index)
            return offset, None if st is None else [st[0].copy(), st[1]]

    def restore(self, mark, end):
        """Forget what was fed in ``[mark's offset, end)``."""
        offset, saved = mark
        first = offset // self.block_size
        last = (max(end, offset + 1) - 1) // self.block_size
        with self._lock:
            for index in range(first, last + 1):
                self._open.pop(index, None)
                self._digests[index] = None
            if saved is not None:
                self._open[first] = saved

    def digests(self, start, end):
        """The digests of the blocks in ``[start, end)`` (``start`` a
        block's start), None for a block not wholly fed yet: a window of
        the image compared as soon as it is moved."""
        with self._lock:
            return self._digests[start // self.block_size:
                                 -(-end // self.block_size)]

    def window_hexdigest(self, start, end):
        """The block hash of the window ``[start, end)`` (whole blocks):
        what the daemon answers for ``/checksum?offset=&length=``; an
        Error if a block of it was not wholly fed."""
        return self._combine(self.digests(start, end),
                             start // self.block_size)

    def hexdigest(self):
        with self._lock:
            digests = list(self._digests)
        return self._combine(digests, 0)

    def _combine(self, digests, first):
        """The hash of ``digests`` (of blocks ``first``...), or an Error
        naming the first block not wholly fed."""
        if None in digests:
            index = first + digests.index(None)
            raise errors.Error(
                "Block hash incomplete: block {} (offset {}) was not "
                "transferred".format(index, index * self.block_size))
        # One update: the same digest as one per block, without a call
        # per block (262,144 of them for a 1 TiB image).
        outer = new_hash(self.algorithm)
        outer.update(b"".join(digests))
        return outer.hexdigest()
