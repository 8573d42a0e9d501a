import gc

import pytest

from imageio._io.buffer import AlignedBuffer


@pytest.mark.parametrize("size,align", [
    (1, 4096), (4096, 4096), (8 * 1024**2, 4096), (100, 512), (3, 8),
    (1024**2, 1024**2),
])
def test_aligned(size, align):
    buf = AlignedBuffer(size, align)
    assert len(buf) == buf.size == size
    assert buf.align == align
    assert buf.address % align == 0


def test_default_align():
    assert AlignedBuffer(10).align == 4096


def test_zeroed():
    buf = AlignedBuffer(1024**2)
    assert bytes(buf) == bytes(1024**2)


def test_writable_view():
    buf = AlignedBuffer(8192)
    view = memoryview(buf)
    assert not view.readonly
    assert view.nbytes == 8192
    assert view.format == "B"
    assert view.contiguous
    view[4096:4100] = b"abcd"
    assert bytes(buf)[4096:4100] == b"abcd"
    # The memory the view shows is the buffer's own.
    import ctypes
    assert ctypes.addressof(ctypes.c_char.from_buffer(view)) == buf.address


def test_view_keeps_memory_alive():
    buf = AlignedBuffer(4096)
    view = memoryview(buf)
    view[:3] = b"xyz"
    del buf
    gc.collect()
    assert bytes(view[:3]) == b"xyz"


@pytest.mark.parametrize("size", [0, -1])
def test_bad_size(size):
    with pytest.raises(ValueError):
        AlignedBuffer(size)


@pytest.mark.parametrize("align", [0, 3, 4095, 4])
def test_bad_align(align):
    with pytest.raises(ValueError):
        AlignedBuffer(4096, align)


def test_huge_size():
    with pytest.raises((MemoryError, OverflowError)):
        AlignedBuffer(1 << 62)


def test_repr():
    assert "size=4096" in repr(AlignedBuffer(4096))


def test_part_shares_memory():
    buf = AlignedBuffer(8192)
    part = buf.part(4096, 4096)
    assert len(part) == 4096 and part.align == buf.align
    assert part.address == buf.address + 4096
    assert part.owner is buf
    memoryview(part)[:3] = b"abc"
    assert bytes(memoryview(buf)[4096:4099]) == b"abc"


def test_part_keeps_owner_alive():
    part = AlignedBuffer(8192).part(0, 4096)
    gc.collect()
    memoryview(part)[:] = b"x" * 4096
    assert bytes(part) == b"x" * 4096
    assert len(part.owner) == 8192


@pytest.mark.parametrize("start,size", [
    (1, 4096), (0, 0), (4096, 4097), (8192, 1), (12288, 1),
])
def test_bad_part(start, size):
    with pytest.raises(ValueError):
        AlignedBuffer(8192).part(start, size)
