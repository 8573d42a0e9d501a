import array

import pytest

from imageio._io.buffer import AlignedBuffer
from imageio._io.zero import is_zero


def test_empty():
    assert is_zero(b"")
    assert is_zero(bytearray())


@pytest.mark.parametrize("size", [1, 2, 15, 16, 17, 31, 32, 33, 4095, 4096,
                                  4097, 256 * 1024, 8 * 1024**2 + 1])
def test_zero(size):
    assert is_zero(bytes(size))
    assert is_zero(bytearray(size))


@pytest.mark.parametrize("size", [1, 15, 16, 17, 33, 4097, 256 * 1024 + 3])
def test_non_zero_at_every_interesting_position(size):
    for pos in {0, 1, 14, 15, 16, 17, size // 2, size - 2, size - 1}:
        if not 0 <= pos < size:
            continue
        data = bytearray(size)
        data[pos] = 1
        assert not is_zero(data), pos


def test_high_bit():
    assert not is_zero(b"\x00" * 100 + b"\x80")


def test_aligned_buffer():
    buf = AlignedBuffer(8 * 1024**2)
    assert is_zero(buf)
    memoryview(buf)[-1] = 1
    assert not is_zero(buf)
    assert is_zero(memoryview(buf)[:-1])


def test_other_formats():
    assert is_zero(array.array("I", [0] * 100))
    assert not is_zero(array.array("I", [0] * 99 + [1 << 24]))
    assert is_zero(memoryview(bytes(64)).cast("Q"))


def test_non_contiguous():
    with pytest.raises(BufferError):
        is_zero(memoryview(bytes(64))[::2])


def test_not_bytes_like():
    with pytest.raises(TypeError):
        is_zero("text")
