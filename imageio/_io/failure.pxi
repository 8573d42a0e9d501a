# Failures recorded without the GIL, raised once the GIL is held again.
# Included by nbd.pyx (its cimports and constants are in scope).

class Error(OSError):
    """A libnbd call failed.

    ``errno`` is ``nbd_get_errno()`` (may be 0), ``strerror`` is
    ``nbd_get_error()``'s text.
    """

    def __str__(self):
        return self.strerror or "libnbd error"


# Where a failure happened, recorded without the GIL and raised later.
cdef enum FailKind:
    FAIL_NONE = 0
    FAIL_NBD        # a libnbd call failed: nbd_get_errno/nbd_get_error
    FAIL_OS         # a syscall on the client socket failed: errno
    FAIL_TIMEOUT    # nothing happened for the timeout
    FAIL_PROTOCOL   # the server answered something we cannot use

cdef struct Failure:
    FailKind kind
    int err
    char msg[512]


cdef void _fail_nbd(Failure *f) noexcept nogil:
    if f.kind != FAIL_NONE:
        return
    f.kind = FAIL_NBD
    f.err = lib.nbd_get_errno()
    cdef const char *m = lib.nbd_get_error()
    if m == NULL:
        m = "unknown libnbd error"
    strncpy(f.msg, m, sizeof(f.msg) - 1)
    f.msg[sizeof(f.msg) - 1] = 0


cdef void _fail(Failure *f, FailKind kind, int err, const char *msg) noexcept nogil:
    if f.kind != FAIL_NONE:
        return
    f.kind = kind
    f.err = err
    strncpy(f.msg, msg, sizeof(f.msg) - 1)
    f.msg[sizeof(f.msg) - 1] = 0


cdef int _raise_failure(Failure *f) except -1:
    msg = f.msg.decode("utf-8", "replace")
    if f.kind == FAIL_NBD:
        raise Error(f.err, msg)
    if f.kind == FAIL_OS:
        # OSError() picks the subclass: BrokenPipeError, ConnectionResetError...
        raise OSError(f.err, os.strerror(f.err))
    if f.kind == FAIL_TIMEOUT:
        raise TimeoutError(ETIMEDOUT, msg)
    raise Error(f.err or EPROTO, msg)


cdef int _raise_last() except -1:
    cdef Failure f
    f.kind = FAIL_NONE
    _fail_nbd(&f)
    return _raise_failure(&f)
