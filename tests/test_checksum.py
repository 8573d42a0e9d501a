"""Block hash: the same digest as hashing every byte, whatever the
zero/data layout, the algorithm, the block size and the worker count."""

import hashlib
import os

import pytest

from imageio import checksum
from imageio import errors
from imageio.extents import Extent

MiB = 1024**2


class MemoryBackend:
    """An image in memory with given extents (a test double for the
    backend's read and extents calls only)."""

    features = frozenset({"extents"})

    def __init__(self, data, extents=None):
        self.data = data
        self._extents = extents
        self.reads = []
        self.extent_calls = []

    def extents(self, offset=0, length=None, context="zero"):
        # As the real backends: the extents covering [offset, offset +
        # length), clipped.
        assert context == "zero"
        end = len(self.data) if length is None else offset + length
        self.extent_calls.append((offset, end))
        extents = self._extents
        if extents is None:
            extents = [Extent(0, len(self.data), False, False)]
        out = []
        for e in extents:
            start, stop = max(e.start, offset), min(e.start + e.length, end)
            if start < stop:
                out.append(Extent(start, stop - start, e.zero, e.hole))
        return out

    def readinto(self, buf, offset, length):
        self.reads.append((offset, length))
        view = memoryview(buf)[:length]
        view[:] = self.data[offset:offset + length]
        return view


def reference(data, algorithm="blake2b", block_size=4 * MiB):
    def new():
        if algorithm == "blake3":
            import blake3
            return blake3.blake3()
        if algorithm == "xxh3_128":
            import xxhash
            return xxhash.xxh3_128()
        return hashlib.blake2b(digest_size=32) if algorithm == "blake2b" \
            else hashlib.new(algorithm)
    outer = new()
    for i in range(0, len(data), block_size):
        h = new()
        h.update(data[i:i + block_size])
        outer.update(h.digest())
    return outer.hexdigest()


# Data layouts of a 10 MiB + 7 image: none, at the start, across a block
# boundary, unaligned, all data, several in one block.
CLUSTERS = [
    [],
    [(0, 64 * 1024)],
    [(4 * MiB - 4096, 8192)],
    [(5 * MiB + 12345, 100)],
    [(0, 10 * MiB + 7)],
    [(MiB, 64 * 1024), (3 * MiB, 4096), (9 * MiB, MiB)],
]


def sparse(size, clusters):
    """Data at ``clusters`` [(offset, length)], zero elsewhere, and the
    matching extents."""
    data = bytearray(size)
    extents = []
    pos = 0
    for offset, length in sorted(clusters):
        data[offset:offset + length] = os.urandom(length)
        if offset > pos:
            extents.append(Extent(pos, offset - pos, True, False))
        extents.append(Extent(offset, length, False, False))
        pos = offset + length
    if pos < size:
        extents.append(Extent(pos, size - pos, True, False))
    return bytes(data), extents


@pytest.mark.parametrize("clusters", CLUSTERS)
@pytest.mark.parametrize("workers", [1, 2, 4])
def test_same_as_hashing_every_byte(clusters, workers):
    data, extents = sparse(10 * MiB + 7, clusters)
    backend = MemoryBackend(data, extents)
    assert checksum.compute(backend, len(data), workers=workers) == \
        reference(data)


def test_zero_extents_are_not_read():
    data, extents = sparse(16 * MiB, [(5 * MiB, 64 * 1024)])
    backend = MemoryBackend(data, extents)
    checksum.compute(backend, len(data))
    assert backend.reads == [(5 * MiB, 64 * 1024)]


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "md5", "blake2s",
                                       "blake3", "xxh3_128"])
@pytest.mark.parametrize("block_size", [MiB, 16 * MiB])
def test_algorithms_and_block_sizes(algorithm, block_size):
    data, extents = sparse(20 * MiB + 1, [(MiB + 3, 2 * MiB), (19 * MiB, 5)])
    backend = MemoryBackend(data, extents)
    assert checksum.compute(backend, len(data), algorithm, block_size) == \
        reference(data, algorithm, block_size)


def test_without_extents():
    data = os.urandom(5 * MiB)
    backend = MemoryBackend(data)
    backend.features = frozenset()
    assert checksum.compute(backend, len(data)) == reference(data)


def test_progress_and_cancel():
    data, extents = sparse(40 * MiB, [(0, 40 * MiB)])
    backend = MemoryBackend(data, extents)
    seen = []

    def progress(n):
        seen.append(n)
        if len(seen) == 3:
            raise errors.Canceled("stop")

    with pytest.raises(errors.Canceled):
        checksum.compute(backend, len(data), progress=progress)
    assert seen == [4 * MiB] * 3


@pytest.mark.parametrize("block_size", [0, 4095, MiB + 1, 32 * MiB])
def test_bad_block_size(block_size):
    with pytest.raises(errors.BadRequest):
        checksum.compute(MemoryBackend(b""), 0, block_size=block_size)


def test_bad_algorithm():
    with pytest.raises(errors.BadRequest):
        checksum.compute(MemoryBackend(b""), 0, "md42")


def test_sparse_data_blocks_are_hashed_in_parallel():
    """Zero blocks cost nothing, so they must not fill the in-flight window:
    with data in every sixth block, two workers still read two data blocks
    at once (each read waits for the other at a barrier; a window counting
    zero blocks holds one data block at a time and the barrier breaks)."""
    import threading
    block = MiB
    clusters = [(i * block, 64 * 1024) for i in (0, 6, 12, 18)]
    data, extents = sparse(24 * block, clusters)
    barrier = threading.Barrier(2, timeout=10)

    class Paired(MemoryBackend):
        def readinto(self, buf, offset, length):
            barrier.wait()
            return super().readinto(buf, offset, length)

    backend = Paired(data, extents)
    assert checksum.compute(backend, len(data), block_size=block,
                            workers=2) == reference(data, block_size=block)
    assert sorted(backend.reads) == clusters


def test_many_finished_blocks_waiting_in_order(monkeypatch):
    # A bounded list of finished blocks waits behind a slow earlier block;
    # the digest keeps the block order.
    monkeypatch.setattr(checksum, "MAX_PENDING", 3)
    data, extents = sparse(20 * MiB, [(0, 4096), (9 * MiB, 5),
                                      (19 * MiB, MiB)])
    backend = MemoryBackend(data, extents)
    assert checksum.compute(backend, len(data), block_size=MiB,
                            workers=2) == reference(data, block_size=MiB)


# The block hash fed while a transfer moves the bytes (the client's
# verification).

def feed_pieces(hasher, data, extents, cut, order):
    """Feed ``data`` as pieces of at most ``cut`` bytes split on extent
    boundaries, zero extents as zeroes; blocks in ``order`` (each block's
    pieces in order)."""
    bs = hasher.block_size
    per_block = {}
    for e in extents:
        pos, end = e.start, e.start + e.length
        while pos < end:
            n = min(cut, end - pos, bs - pos % bs)
            per_block.setdefault(pos // bs, []).append((pos, n, e.zero))
            pos += n
    for b in order(sorted(per_block)):
        for pos, n, zero in per_block[b]:
            if zero:
                hasher.zero(pos, n)
            else:
                hasher.data(pos, memoryview(data)[pos:pos + n])


@pytest.mark.parametrize("clusters", CLUSTERS)
@pytest.mark.parametrize("algorithm", ["blake2b", "sha256", "blake3",
                                       "xxh3_128"])
@pytest.mark.parametrize("cut", [4096, 3 * MiB + 5, 16 * MiB])
def test_block_hasher_same_as_compute(clusters, algorithm, cut):
    data, extents = sparse(10 * MiB + 7, clusters)
    expected = checksum.compute(MemoryBackend(data, extents), len(data),
                                algorithm=algorithm)
    assert expected == reference(data, algorithm)
    for order in (list, lambda blocks: list(reversed(blocks))):
        h = checksum.BlockHasher(len(data), algorithm)
        feed_pieces(h, data, extents, cut, order)
        assert h.hexdigest() == expected


def test_block_hasher_from_threads():
    import concurrent.futures
    import random
    data, extents = sparse(64 * MiB + 1, [(i * 3 * MiB + 777, MiB + 5)
                                         for i in range(20)])
    h = checksum.BlockHasher(len(data), "sha256")
    blocks = list(range(0, len(data), 4 * MiB))
    random.Random(1).shuffle(blocks)

    def one(start):
        sub = [Extent(max(e.start, start), min(e.start + e.length,
                                               start + 4 * MiB) -
                      max(e.start, start), e.zero, False)
               for e in extents
               if e.start < start + 4 * MiB and e.start + e.length > start]
        feed_pieces(h, data, sub, 256 * 1024, list)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(one, blocks))
    assert h.hexdigest() == reference(data, "sha256")


def test_block_hasher_restore_takes_back_a_failed_request():
    data = os.urandom(9 * MiB)
    h = checksum.BlockHasher(len(data), "sha256")
    h.zero(0, MiB)           # a zero piece before the request
    mark = h.checkpoint(MiB)
    h.data(MiB, data[MiB:6 * MiB])   # the request fails half-way
    h.restore(mark, 8 * MiB)
    with pytest.raises(errors.Error, match="incomplete"):
        h.hexdigest()
    # The retry feeds the whole request again.
    h.data(MiB, data[MiB:8 * MiB])
    h.data(8 * MiB, data[8 * MiB:])
    expected = bytearray(data)
    expected[:MiB] = bytes(MiB)
    assert h.hexdigest() == reference(bytes(expected), "sha256")


def test_block_hasher_refuses_what_it_cannot_hash():
    h = checksum.BlockHasher(8 * MiB, "sha256")
    with pytest.raises(RuntimeError, match="out of order"):
        h.data(MiB, b"x" * 10)  # a block's middle before its start
    h.data(0, b"x" * 10)
    with pytest.raises(RuntimeError, match="out of order"):
        h.data(20, b"x")        # a gap
    h.zero(4 * MiB, 4 * MiB)
    with pytest.raises(RuntimeError, match="out of order"):
        h.zero(4 * MiB, 4096)   # a finished block again
    with pytest.raises(errors.Error, match="block 0 .offset 0. was not"):
        h.hexdigest()


def test_zero_map_asked_window_by_window(monkeypatch):
    # The zero map of a huge image is never held whole: asked for one
    # window at a time, with the same digest.
    monkeypatch.setattr(checksum, "ZERO_MAP_WINDOW", 2 * MiB)
    data, extents = sparse(10 * MiB + 7, CLUSTERS[5])
    backend = MemoryBackend(data, extents)
    assert checksum.compute(backend, len(data), block_size=MiB) == \
        reference(data, block_size=MiB)
    assert backend.extent_calls == [(0, 2 * MiB), (2 * MiB, 4 * MiB),
                                    (4 * MiB, 6 * MiB), (6 * MiB, 8 * MiB),
                                    (8 * MiB, 10 * MiB),
                                    (10 * MiB, 10 * MiB + 7)]


def test_shared_executor_and_leased_buffers():
    # The daemon's way: blocks hashed on a shared executor with buffers
    # leased (and all given back) per block.
    import concurrent.futures
    from imageio._io.buffer import AlignedBuffer
    data, extents = sparse(10 * MiB + 7, CLUSTERS[5])
    leased = []

    def lease():
        buf = AlignedBuffer(checksum.CHUNK + checksum.READ_SLACK)
        leased.append(buf)
        return buf, lambda: leased.remove(buf)

    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        for _ in range(2):
            assert checksum.compute(
                MemoryBackend(data, extents), len(data), block_size=MiB,
                executor=ex, buffers=lease) == \
                reference(data, block_size=MiB)
        assert ex._max_workers == 2
    assert leased == []


@pytest.mark.parametrize("algorithm,size", [("blake3", 64),
                                            ("xxh3_128", 32)])
def test_fast_hashes_offered_with_their_own_digest(algorithm, size):
    # The block hash construction over BLAKE3 (the package's 32-byte
    # digest) and XXH3-128 (16 bytes, what the client's verification uses
    # with this daemon), listed beside hashlib's algorithms.
    assert algorithm in checksum.algorithms()
    data, extents = sparse(9 * MiB + 3, [(MiB + 5, 3 * MiB)])
    digest = checksum.compute(MemoryBackend(data, extents), len(data),
                              algorithm)
    assert digest == reference(data, algorithm)
    assert digest != reference(data, "blake2b")
    assert len(digest) == size
    # One byte changed anywhere changes it.
    data = bytearray(data)
    data[2 * MiB] ^= 1
    assert checksum.compute(MemoryBackend(bytes(data), extents), len(data),
                            algorithm) != digest
