# C-level entry points of directio, shared with stream.pyx.

from imageio._io.buffer cimport AlignedBuffer
from imageio._io.syscalls cimport off_t

# Read up to n bytes at off into p; fewer only at end of file.  Returns the
# count, or -errno.
cdef ssize_t pread_full(int fd, char *p, size_t n, off_t off,
                        size_t align) noexcept nogil

# Write all n bytes at off.  Returns 0 or -errno.
cdef ssize_t pwrite_all(int fd, const char *p, size_t n,
                        off_t off) noexcept nogil

# Write n bytes from p at off, O_DIRECT-aware when align > 1 (see
# directio.write).  Raises OSError.
cdef int write_data(int fd, const char *p, size_t n, off_t off,
                    AlignedBuffer bounce, size_t align, object lock) except -1

cdef int raise_errno(ssize_t err) except -1
cdef int check_offset(off_t offset) except -1
