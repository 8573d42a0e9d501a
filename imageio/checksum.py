"""Block hash of an image (SPEC section 5).

Split the image into ``block_size`` blocks (the last may be shorter); each
block's digest is H(block); the image digest is H over the concatenated
block digests.  Zero extents are never read: the digest of a zero block is
computed once per length and reused, so sparse images cost almost nothing,
and the result is the same as hashing the zeroes.

hashlib releases the GIL while hashing large buffers, so hashing a block
overlaps reading the next one in another thread.
"""

import concurrent.futures
import hashlib

from . import errors

DEFAULT_ALGORITHM = "blake2b"
DEFAULT_BLOCK_SIZE = 4 * 1024**2
MIN_BLOCK_SIZE = 1024**2
MAX_BLOCK_SIZE = 16 * 1024**2


def algorithms():
    """Algorithms with a fixed digest size that hashlib always has."""
    return sorted(a for a in hashlib.algorithms_guaranteed
                  if not a.startswith("shake_"))


def new_hash(algorithm):
    if algorithm not in algorithms():
        raise errors.BadRequest(
            "Unsupported checksum algorithm {!r}; supported: {}".format(
                algorithm, ", ".join(algorithms())))
    if algorithm == "blake2b":
        # Compatible with the established service: 32-byte blake2b.
        return hashlib.blake2b(digest_size=32)
    return hashlib.new(algorithm)


def validate_block_size(block_size):
    if not (MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE) or \
            block_size % 4096:
        raise errors.BadRequest(
            "Invalid block_size {}: expected a multiple of 4096 between {} "
            "and {}".format(block_size, MIN_BLOCK_SIZE, MAX_BLOCK_SIZE))


class _ZeroDigests:

    def __init__(self, algorithm):
        self._algorithm = algorithm
        self._cache = {}

    def get(self, length):
        digest = self._cache.get(length)
        if digest is None:
            h = new_hash(self._algorithm)
            zeros = bytes(min(length, 1024**2))
            left = length
            while left:
                n = min(left, len(zeros))
                h.update(zeros[:n] if n < len(zeros) else zeros)
                left -= n
            digest = self._cache[length] = h.digest()
        return digest


CHUNK = 4 * 1024**2


def compute(backend, size, algorithm=DEFAULT_ALGORITHM,
            block_size=DEFAULT_BLOCK_SIZE, progress=None):
    """Return the block hash of the first ``size`` bytes of ``backend`` as
    a hex string.  ``progress(n)`` is called per block (it may raise
    Canceled)."""
    from ._io.buffer import AlignedBuffer
    validate_block_size(block_size)
    new_hash(algorithm)
    outer = new_hash(algorithm)
    zero = _ZeroDigests(algorithm)
    # Two buffers: one is hashed in a worker thread while the next chunk
    # is read into the other.
    chunk = CHUNK
    halves = (AlignedBuffer(chunk + 8192), AlignedBuffer(chunk + 8192))
    zero_ranges = _zero_ranges(backend, size)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = None
        turn = 0
        for start in range(0, size, block_size):
            length = min(block_size, size - start)
            if _covered(zero_ranges, start, length):
                if pending:
                    pending.result()
                    pending = None
                outer.update(zero.get(length))
            else:
                h = new_hash(algorithm)
                pos = start
                end = start + length
                while pos < end:
                    n = min(chunk, end - pos)
                    view = _read(backend, halves[turn], pos, n)
                    if pending:
                        pending.result()
                    pending = pool.submit(h.update, view)
                    turn ^= 1
                    pos += n
                pending.result()
                pending = None
                outer.update(h.digest())
            if progress:
                progress(length)
    return outer.hexdigest()


def _read(backend, half, offset, length):
    return backend.readinto(half, offset, length)


def _zero_ranges(backend, size):
    """Sorted (start, end) of zero extents, or [] if unknown."""
    if "extents" not in backend.features:
        return []
    try:
        return [(e.start, e.start + e.length)
                for e in backend.extents("zero") if e.zero]
    except errors.Error:
        return []


def _covered(ranges, start, length):
    """Whether [start, start+length) lies inside one zero range.  Ranges
    are merged, so one range covers it or none does."""
    import bisect
    i = bisect.bisect_right(ranges, (start, float("inf"))) - 1
    return i >= 0 and ranges[i][0] <= start and \
        ranges[i][1] >= start + length
