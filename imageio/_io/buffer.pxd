cdef class AlignedBuffer:
    # Start of the memory: aligned to ``align`` bytes, ``size`` bytes long.
    cdef char *data
    cdef readonly size_t size
    cdef readonly size_t align
