# Linux system calls used by the byte-moving modules (buffer, directio,
# stream, zero, nbd), declared once.  Only what imageio uses; all may block, so all are
# nogil and callers release the GIL around them.

from libc.stdint cimport uint64_t


cdef extern from "<sys/types.h>" nogil:
    ctypedef long off_t


cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EAGAIN
        EINTR
        EINVAL
        ENOMEM
        ENOTCONN
        EOPNOTSUPP
        EPROTO
        ETIMEDOUT


cdef extern from "<stdlib.h>" nogil:
    int posix_memalign(void **memptr, size_t alignment, size_t size)
    void *realloc(void *ptr, size_t size)
    void free(void *ptr)


cdef extern from "<string.h>" nogil:
    void *memcpy(void *dest, const void *src, size_t n)
    void *memset(void *s, int c, size_t n)
    int memcmp(const void *s1, const void *s2, size_t n)
    char *strerror(int errnum)
    size_t strlen(const char *s)
    int strcmp(const char *s1, const char *s2)
    int strncmp(const char *s1, const char *s2, size_t n)
    char *strncpy(char *dest, const char *src, size_t n)


cdef extern from "<unistd.h>" nogil:
    ssize_t pread(int fd, void *buf, size_t count, off_t offset)
    ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset)
    int fdatasync(int fd)


cdef extern from "<fcntl.h>" nogil:
    int fcntl(int fd, int cmd, ...)
    int fallocate(int fd, int mode, off_t offset, off_t len)
    enum:
        F_GETFL
        F_SETFL
        O_DIRECT
        FALLOC_FL_KEEP_SIZE
        FALLOC_FL_PUNCH_HOLE
        FALLOC_FL_ZERO_RANGE


cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)


cdef extern from "<linux/fs.h>" nogil:
    enum:
        BLKGETSIZE64
        BLKZEROOUT
        BLKDISCARD
        BLKSSZGET


cdef extern from "<sys/sendfile.h>" nogil:
    ssize_t sendfile(int out_fd, int in_fd, off_t *offset, size_t count)


cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    enum:
        MSG_DONTWAIT
        MSG_NOSIGNAL


cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum:
        POLLIN
        POLLOUT
        POLLERR
        POLLHUP
        POLLNVAL


cdef extern from "<sys/vfs.h>" nogil:
    struct statfs:
        long f_type
    int fstatfs(int fd, statfs *buf)
