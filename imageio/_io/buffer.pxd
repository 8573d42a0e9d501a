cdef class AlignedBuffer:
    # Start of the memory: aligned to ``align`` bytes, ``size`` bytes long.
    cdef char *data
    cdef readonly size_t size
    cdef readonly size_t align
    # The buffer this one is a part of (shares its memory), or None.
    cdef readonly object owner
    # Whether ``data`` was allocated here (a C flag: the GC may clear
    # ``owner`` before the buffer is freed).
    cdef bint allocated
