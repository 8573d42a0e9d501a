# Timeouts for poll(2)-style waits, shared by every _io module so they
# cannot drift apart again: nbd.pyx once truncated with <int>(t * 1000),
# which overflowed for t >= 2,147,484 s (a ticket's inactivity_timeout may
# be up to 2**32 s) and made every NBD request fail.

from libc.math cimport ceil
from libc.stdint cimport int64_t
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

# The largest timeout poll() takes: about 24.8 days.  Longer waits are
# clamped; a peer idle that long has a deadline far beyond any transfer.
cdef enum:
    MAX_TIMEOUT_MS = 0x7fffffff


cdef inline int timeout_ms(timeout) except? -2:
    """Seconds (float, None or negative: forever) to poll milliseconds:
    rounded up so a short timeout never becomes 0 (a busy loop), and
    clamped to MAX_TIMEOUT_MS."""
    if timeout is None or timeout < 0:
        return -1
    cdef double ms = ceil(<double>timeout * 1000.0)
    if ms >= MAX_TIMEOUT_MS:
        return MAX_TIMEOUT_MS
    return <int>ms


cdef inline int64_t now_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000
