"""Aligned memory for O_DIRECT I/O.

``AlignedBuffer`` owns memory from ``posix_memalign`` and exposes it through
the writable buffer protocol, so Python code can slice it with
``memoryview(buf)`` and the ``_io`` modules (``cimport`` of ``buffer.pxd``)
use its ``data`` pointer directly, without copies.
"""

from cpython.buffer cimport PyBuffer_FillInfo

from imageio._io.syscalls cimport free, memset, posix_memalign


cdef class AlignedBuffer:
    """AlignedBuffer(size, align=4096)

    ``size`` bytes (> 0) of zeroed memory starting at an address that is a
    multiple of ``align`` (a power of two, at least ``sizeof(void *)``).
    Freed when the object is.  Raises ValueError for a bad size or
    alignment, MemoryError when out of memory.
    """

    def __cinit__(self, size, align=4096):
        cdef void *p = NULL
        cdef int err
        if size <= 0:
            raise ValueError("Invalid size: {}".format(size))
        if align < sizeof(void *) or align & (align - 1):
            raise ValueError("Invalid alignment: {}".format(align))
        self.size = size
        self.align = align
        err = posix_memalign(&p, self.align, self.size)
        if err:
            raise MemoryError(
                "Cannot allocate {} bytes aligned to {}".format(size, align))
        self.data = <char *>p
        # Zeroed: the buffer never leaks old heap contents to a client, and a
        # fresh buffer can be the source of zeroes.
        with nogil:
            memset(self.data, 0, self.size)

    def __dealloc__(self):
        free(self.data)
        self.data = NULL

    def __getbuffer__(self, Py_buffer *view, int flags):
        PyBuffer_FillInfo(view, self, self.data, self.size, 0, flags)

    def __releasebuffer__(self, Py_buffer *view):
        pass

    def __len__(self):
        return self.size

    @property
    def address(self):
        """The memory's address (int), for tests and diagnostics."""
        return <size_t>self.data

    def __repr__(self):
        return "<AlignedBuffer size={} align={} address=0x{:x}>".format(
            self.size, self.align, <size_t>self.data)
