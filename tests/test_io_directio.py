"""directio against real files on ext4 (/var/tmp) and tmpfs (/dev/shm), with
O_DIRECT, and buffered (align=1) for the fallback path.  Every result is
checked byte for byte against a reference bytearray."""

import errno
import os
import threading

import pytest

from imageio._io import directio
from imageio._io.buffer import AlignedBuffer

ALIGN = 4096
SIZE = 1024**2 + 5000   # not a multiple of the block size

OFFSETS = [0, 1, 4095, 4096, 4097, 65535, 1024**2 - 1, SIZE - 4097, SIZE - 1]
LENGTHS = [1, 4095, 4096, 4097, 65537, 1024**2]

STORAGE = {
    # name: (directory, O_DIRECT)
    "ext4-direct": ("/var/tmp", True),
    "tmpfs-direct": ("/dev/shm", True),
    "ext4-buffered": ("/var/tmp", False),
}


@pytest.fixture(params=sorted(STORAGE))
def storage(request):
    yield from _storage(request.param)


# Only the O_DIRECT storages.
@pytest.fixture(params=sorted(k for k, v in STORAGE.items() if v[1]))
def direct_storage(request):
    yield from _storage(request.param)


def _storage(name):
    directory, direct = STORAGE[name]
    path = os.path.join(directory, "imageio-test-{}-{}".format(
        os.getpid(), threading.get_ident()))
    yield Storage(path, direct)
    if os.path.exists(path):
        os.unlink(path)


class Storage:

    def __init__(self, path, direct):
        self.path = path
        self.direct = direct
        self.align = ALIGN if direct else 1

    def create(self, data):
        with open(self.path, "wb") as f:
            f.write(data)
        return self.open()

    def open(self, flags=os.O_RDWR):
        if self.direct:
            flags |= os.O_DIRECT
        fd = os.open(self.path, flags | os.O_CLOEXEC)
        return fd

    def content(self):
        with open(self.path, "rb") as f:
            return f.read()


@pytest.fixture(scope="module")
def reference():
    return bytearray(os.urandom(SIZE))


@pytest.fixture(scope="module")
def buf():
    return AlignedBuffer(1024**2 + 2 * ALIGN)


@pytest.fixture
def bounce():
    # Smaller than the writes: the bounce loop runs several times.
    return AlignedBuffer(3 * ALIGN)


def test_readinto(storage, reference, buf):
    fd = storage.create(reference)
    try:
        for offset in OFFSETS:
            for length in LENGTHS:
                start, count = directio.readinto(
                    fd, buf, offset, length, storage.align)
                want = reference[offset:offset + length]
                assert count == len(want), (offset, length)
                got = memoryview(buf)[start:start + count]
                assert got == want, (offset, length)
                if storage.direct:
                    assert start == offset % ALIGN
    finally:
        os.close(fd)


def test_readinto_past_end(storage, reference, buf):
    fd = storage.create(reference)
    try:
        assert directio.readinto(fd, buf, SIZE, 4096, storage.align)[1] == 0
        assert directio.readinto(fd, buf, SIZE + 10000, 1,
                                 storage.align)[1] == 0
        start, count = directio.readinto(fd, buf, SIZE - 10, 4096,
                                         storage.align)
        assert count == 10
        assert memoryview(buf)[start:start + 10] == reference[-10:]
    finally:
        os.close(fd)


def test_readinto_exact_fit(storage, reference):
    # The aligned superset may fill the buffer exactly.
    buf = AlignedBuffer(8192)
    fd = storage.create(reference)
    try:
        start, count = directio.readinto(fd, buf, 100, 8192 - 100,
                                         storage.align)
        assert memoryview(buf)[start:start + count] == reference[100:8192]
    finally:
        os.close(fd)


def test_readinto_too_large(tmp_path):
    buf = AlignedBuffer(8192)
    fd = os.open(str(tmp_path / "f"), os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(ValueError):
            directio.readinto(fd, buf, 1, 8192, ALIGN)
        with pytest.raises(ValueError):
            directio.readinto(fd, buf, 0, 8193, 1)
        with pytest.raises(ValueError):
            directio.readinto(fd, buf, 0, 10, 3)
    finally:
        os.close(fd)


def test_readinto_bad_fd(buf):
    with pytest.raises(OSError) as e:
        directio.readinto(-1, buf, 0, 10, ALIGN)
    assert e.value.errno == errno.EBADF


@pytest.mark.parametrize("memory", ["bytes", "aligned", "unaligned"])
def test_write(storage, reference, bounce, memory):
    ref = bytearray(reference)
    fd = storage.create(ref)
    src = AlignedBuffer(1024**2 + 2 * ALIGN)
    try:
        for offset in OFFSETS:
            for length in LENGTHS:
                data = os.urandom(length)
                if memory == "bytes":
                    view = data
                else:
                    # Same alignment in memory as in the file ("aligned": the
                    # middle goes straight from it), or off by one (through
                    # the bounce buffer).
                    skip = offset % ALIGN + (memory == "unaligned")
                    view = memoryview(src)[skip:skip + length]
                    view[:] = data
                directio.write(fd, view, offset, bounce, storage.align)
                ref[offset:offset + length] = data
        assert storage.content() == ref
    finally:
        os.close(fd)


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 12000])
@pytest.mark.parametrize("offset,length", [
    (0, 1), (0, 4096), (1, 4095), (4095, 2), (4097, 10000), (5000, 1),
    (12000, 96), (16384, 4096), (20000, 1),
])
def test_write_grows_file_exactly(storage, bounce, size, offset, length):
    ref = bytearray(os.urandom(size))
    fd = storage.create(ref)
    try:
        data = os.urandom(length)
        directio.write(fd, data, offset, bounce, storage.align)
        if offset > len(ref):
            ref.extend(bytes(offset - len(ref)))
        ref[offset:offset + length] = data
        assert os.fstat(fd).st_size == len(ref)
        assert storage.content() == ref
        if storage.direct:
            # The fd is still O_DIRECT after a buffered tail write.
            import fcntl
            assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        os.close(fd)


def test_write_empty(storage, bounce):
    fd = storage.create(b"abc")
    try:
        directio.write(fd, b"", 1, bounce, storage.align)
        directio.write(fd, b"", 100000, bounce, storage.align)
        assert storage.content() == b"abc"
    finally:
        os.close(fd)


def test_write_needs_bounce(direct_storage):
    # Buffered writes need no bounce buffer; O_DIRECT ones do.
    storage = direct_storage
    fd = storage.create(b"")
    try:
        with pytest.raises(ValueError):
            directio.write(fd, b"x", 1, None, ALIGN)
        with pytest.raises(ValueError):
            directio.write(fd, b"x", 1, AlignedBuffer(512, 512), ALIGN)
    finally:
        os.close(fd)


def test_write_read_only_fd(storage, bounce):
    storage.create(b"x" * 8192)
    fd = storage.open(os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            directio.write(fd, b"y" * 4096, 0, bounce, storage.align)
        assert e.value.errno == errno.EBADF
    finally:
        os.close(fd)


def test_write_no_space(bounce, tmp_path):
    # /dev/full fails every write with ENOSPC.
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as e:
            directio.write(fd, b"y" * 100, 0, bounce, 1)
        assert e.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_write_lock(storage, bounce):
    class Lock:
        taken = 0

        def acquire(self):
            self.taken += 1

        def release(self):
            pass

    lock = Lock()
    fd = storage.create(bytes(3 * ALIGN))
    try:
        # Aligned: no read-modify-write, no lock.
        directio.write(fd, bytes(ALIGN), ALIGN, bounce, storage.align, lock)
        assert lock.taken == 0
        directio.write(fd, b"x" * ALIGN, 1, bounce, storage.align, lock)
        assert lock.taken == (2 if storage.direct else 0)
    finally:
        os.close(fd)


def test_concurrent_writers_sharing_blocks(storage):
    """Writers of neighbouring unaligned ranges, each with its own fd (as
    connections have), lose nothing when they share the lock."""
    lock = threading.Lock()
    nthreads = 4
    piece = 4096 * 8 + 1000     # unaligned: neighbours share blocks
    rounds = 20
    storage.create(bytes(nthreads * piece * rounds))
    ref = bytearray(nthreads * piece * rounds)

    def writer(i):
        fd = storage.open()
        bounce = AlignedBuffer(ALIGN)
        try:
            for r in range(rounds):
                offset = (r * nthreads + i) * piece
                data = bytes([i + 1]) * piece
                directio.write(fd, data, offset, bounce, storage.align, lock)
        finally:
            os.close(fd)

    for r in range(rounds):
        for i in range(nthreads):
            offset = (r * nthreads + i) * piece
            ref[offset:offset + piece] = bytes([i + 1]) * piece
    threads = [threading.Thread(target=writer, args=(i,))
               for i in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert storage.content() == ref


def test_fallocate_punch_hole(storage):
    fd = storage.create(b"x" * 3 * 1024**2)
    try:
        directio.fallocate(
            fd, directio.FALLOC_FL_PUNCH_HOLE | directio.FALLOC_FL_KEEP_SIZE,
            1000, 1024**2)
        ref = bytearray(b"x" * 3 * 1024**2)
        ref[1000:1000 + 1024**2] = bytes(1024**2)
        assert storage.content() == ref
        assert os.fstat(fd).st_size == 3 * 1024**2
        # The aligned part is deallocated.
        assert os.lseek(fd, 4096, os.SEEK_HOLE) == 4096
    finally:
        os.close(fd)


def test_fallocate_zero_range(storage):
    fd = storage.create(b"x" * 8192)
    try:
        try:
            directio.fallocate(fd, directio.FALLOC_FL_ZERO_RANGE, 1, 10000)
        except OSError as e:
            # tmpfs has no ZERO_RANGE (callers fall back to writing
            # zeroes); the file is left as it was.
            assert e.errno == errno.EOPNOTSUPP
            assert storage.path.startswith("/dev/shm/")
            assert storage.content() == b"x" * 8192
            return
        assert storage.content() == b"x" + bytes(10000)
    finally:
        os.close(fd)


def test_fallocate_bad_mode(storage):
    fd = storage.create(b"x")
    try:
        with pytest.raises(OSError):
            directio.fallocate(fd, directio.FALLOC_FL_PUNCH_HOLE, 0, 1)
    finally:
        os.close(fd)


def test_fdatasync(storage):
    fd = storage.create(b"x")
    try:
        directio.fdatasync(fd)
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        directio.fdatasync(-1)


def test_supports_direct(storage, tmp_path):
    os.close(storage.create(b""))
    assert directio.supports_direct(storage.path)
    with pytest.raises(FileNotFoundError):
        directio.supports_direct(str(tmp_path / "missing"))


def test_block_ioctls_on_regular_file(storage):
    fd = storage.create(b"x" * 4096)
    try:
        for call in (lambda: directio.blkgetsize64(fd),
                     lambda: directio.blkzeroout(fd, 0, 4096),
                     lambda: directio.blkdiscard(fd, 0, 4096)):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == errno.ENOTTY
    finally:
        os.close(fd)


def test_negative_offset(storage, buf, bounce):
    fd = storage.create(b"x" * 8192)
    try:
        with pytest.raises(ValueError):
            directio.readinto(fd, buf, -1, 10, storage.align)
        with pytest.raises(ValueError):
            directio.write(fd, b"y", -4096, bounce, storage.align)
        assert storage.content() == b"x" * 8192
    finally:
        os.close(fd)


def test_fs_type(storage):
    fd = storage.create(b"")
    try:
        on_tmpfs = storage.path.startswith("/dev/shm/")
        assert (directio.fs_type(fd) == directio.TMPFS_MAGIC) == on_tmpfs
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        directio.fs_type(-1)
