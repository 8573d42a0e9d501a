"""Aligned memory for O_DIRECT I/O.

``AlignedBuffer`` owns memory from ``posix_memalign`` and exposes it through
the writable buffer protocol, so Python code can slice it with
``memoryview(buf)`` and the ``_io`` modules (``cimport`` of ``buffer.pxd``)
use its ``data`` pointer directly, without copies.  ``part()`` lends an
aligned piece of it as another AlignedBuffer: the copy engine splits one
transfer buffer into halves to overlap reads and writes.
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

    def __cinit__(self, size, align=4096, AlignedBuffer _owner=None,
                  size_t _start=0):
        cdef void *p = NULL
        cdef int err
        if _owner is not None:
            # A part of _owner (see part()): shares its memory, keeps it alive.
            self.owner = _owner
            self.data = _owner.data + _start
            self.size = size
            self.align = _owner.align
            return
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
        self.allocated = True
        # Zeroed: the buffer never leaks old heap contents to a client, and a
        # fresh buffer can be the source of zeroes.
        with nogil:
            memset(self.data, 0, self.size)

    def __dealloc__(self):
        if self.allocated:
            free(self.data)
        self.data = NULL

    def part(self, size_t start, size_t size):
        """An AlignedBuffer of ``size`` bytes at ``start`` of this one,
        sharing its memory.  ``start`` must keep the alignment.  Raises
        ValueError when the part does not fit."""
        if start % self.align or size == 0 or start > self.size or \
                size > self.size - start:
            raise ValueError("Invalid part {}+{} of {!r}".format(
                start, size, self))
        return AlignedBuffer(size, self.align, self, start)

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
