"""Zero detection over any contiguous bytes-like object."""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer

from imageio._io.syscalls cimport memcmp

cdef enum:
    # Bytes checked one by one before comparing the buffer against itself.
    HEAD = 16
    # Smaller buffers are scanned with the GIL held: releasing and taking it
    # back costs more than the scan.
    NOGIL_MIN = 256 * 1024


cdef bint _is_zero(const unsigned char *p, size_t n) noexcept nogil:
    cdef size_t i
    for i in range(min(n, <size_t>HEAD)):
        if p[i]:
            return False
    if n <= <size_t>HEAD:
        return True
    # The first HEAD bytes are zero; if every byte equals the one HEAD
    # before it, all are zero.  memcmp is vectorized, so this runs at
    # memory bandwidth.
    return memcmp(p, p + HEAD, n - HEAD) == 0


def is_zero(data):
    """Return True if every byte of ``data`` (any contiguous bytes-like
    object) is zero; True for empty data.  The GIL is released while
    scanning large buffers."""
    cdef Py_buffer view
    cdef bint result
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        if view.len < NOGIL_MIN:
            result = _is_zero(<const unsigned char *>view.buf, view.len)
        else:
            with nogil:
                result = _is_zero(<const unsigned char *>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
    return result
