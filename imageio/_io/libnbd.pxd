# Declarations from <libnbd.h> (libnbd 1.14), only what imageio uses.
#
# Every function may block on the network, so all are declared nogil; the
# callers release the GIL around them.

from libc.stdint cimport int64_t, uint32_t, uint64_t


cdef extern from "<libnbd.h>" nogil:

    struct nbd_handle:
        pass

    enum:
        LIBNBD_TLS_DISABLE
        LIBNBD_TLS_ALLOW
        LIBNBD_TLS_REQUIRE

        LIBNBD_SIZE_MINIMUM
        LIBNBD_SIZE_PREFERRED
        LIBNBD_SIZE_MAXIMUM

        LIBNBD_CMD_FLAG_FUA
        LIBNBD_CMD_FLAG_NO_HOLE
        LIBNBD_CMD_FLAG_DF
        LIBNBD_CMD_FLAG_REQ_ONE
        LIBNBD_CMD_FLAG_FAST_ZERO

        LIBNBD_SHUTDOWN_ABANDON_PENDING

        LIBNBD_AIO_DIRECTION_READ
        LIBNBD_AIO_DIRECTION_WRITE
        LIBNBD_AIO_DIRECTION_BOTH

        LIBNBD_STATE_HOLE
        LIBNBD_STATE_ZERO

    const char *LIBNBD_CONTEXT_BASE_ALLOCATION

    # Callbacks are passed by value.
    ctypedef struct nbd_completion_callback:
        int (*callback)(void *user_data, int *error) noexcept nogil
        void *user_data
        void (*free)(void *user_data) noexcept nogil

    ctypedef struct nbd_extent_callback:
        int (*callback)(void *user_data, const char *metacontext,
                        uint64_t offset, uint32_t *entries,
                        size_t nr_entries, int *error) noexcept nogil
        void *user_data
        void (*free)(void *user_data) noexcept nogil

    ctypedef struct nbd_context_callback:
        int (*callback)(void *user_data, const char *name) noexcept nogil
        void *user_data
        void (*free)(void *user_data) noexcept nogil

    nbd_completion_callback NBD_NULL_COMPLETION

    # Handle life.
    nbd_handle *nbd_create()
    void nbd_close(nbd_handle *h)
    const char *nbd_get_error()
    int nbd_get_errno()
    int nbd_set_handle_name(nbd_handle *h, const char *handle_name)
    const char *nbd_get_version(nbd_handle *h)

    # Before connecting.
    int nbd_set_export_name(nbd_handle *h, const char *export_name)
    int nbd_set_tls(nbd_handle *h, int tls)
    int nbd_set_tls_certificates(nbd_handle *h, const char *dir)
    int nbd_set_tls_verify_peer(nbd_handle *h, bint verify)
    int nbd_set_tls_username(nbd_handle *h, const char *username)
    int nbd_set_tls_psk_file(nbd_handle *h, const char *filename)
    int nbd_get_tls_negotiated(nbd_handle *h)
    int nbd_set_request_structured_replies(nbd_handle *h, bint request)
    int nbd_get_structured_replies_negotiated(nbd_handle *h)
    int nbd_set_request_block_size(nbd_handle *h, bint request)
    int nbd_set_strict_mode(nbd_handle *h, uint32_t flags)
    int nbd_set_pread_initialize(nbd_handle *h, bint request)
    int nbd_set_opt_mode(nbd_handle *h, bint enable)
    int nbd_opt_go(nbd_handle *h)
    int nbd_opt_abort(nbd_handle *h)
    int nbd_opt_list_meta_context(nbd_handle *h,
                                  nbd_context_callback context_callback)
    int nbd_add_meta_context(nbd_handle *h, const char *name)
    ssize_t nbd_get_nr_meta_contexts(nbd_handle *h)
    char *nbd_get_meta_context(nbd_handle *h, size_t i)
    int nbd_clear_meta_contexts(nbd_handle *h)
    int nbd_set_uri_allow_local_file(nbd_handle *h, bint allow)
    int nbd_supports_tls(nbd_handle *h)
    int nbd_supports_uri(nbd_handle *h)

    # Connecting.
    int nbd_connect_uri(nbd_handle *h, const char *uri)
    int nbd_connect_unix(nbd_handle *h, const char *unixsocket)
    int nbd_connect_tcp(nbd_handle *h, const char *hostname,
                        const char *port)

    # What the server offers.
    int64_t nbd_get_size(nbd_handle *h)
    int64_t nbd_get_block_size(nbd_handle *h, int size_type)
    int nbd_is_read_only(nbd_handle *h)
    int nbd_can_flush(nbd_handle *h)
    int nbd_can_fua(nbd_handle *h)
    int nbd_can_trim(nbd_handle *h)
    int nbd_can_zero(nbd_handle *h)
    int nbd_can_fast_zero(nbd_handle *h)
    int nbd_can_multi_conn(nbd_handle *h)
    int nbd_can_meta_context(nbd_handle *h, const char *metacontext)
    char *nbd_get_export_name(nbd_handle *h)
    char *nbd_get_uri(nbd_handle *h)

    # Synchronous commands.
    int nbd_pread(nbd_handle *h, void *buf, size_t count, uint64_t offset,
                  uint32_t flags)
    int nbd_pwrite(nbd_handle *h, const void *buf, size_t count,
                   uint64_t offset, uint32_t flags)
    int nbd_flush(nbd_handle *h, uint32_t flags)
    int nbd_trim(nbd_handle *h, uint64_t count, uint64_t offset,
                 uint32_t flags)
    int nbd_zero(nbd_handle *h, uint64_t count, uint64_t offset,
                 uint32_t flags)
    int nbd_block_status(nbd_handle *h, uint64_t count, uint64_t offset,
                         nbd_extent_callback extent_callback, uint32_t flags)
    int nbd_shutdown(nbd_handle *h, uint32_t flags)
    int nbd_poll(nbd_handle *h, int timeout)

    # Asynchronous commands.
    int64_t nbd_aio_pread(nbd_handle *h, void *buf, size_t count,
                          uint64_t offset,
                          nbd_completion_callback completion_callback,
                          uint32_t flags)
    int64_t nbd_aio_pwrite(nbd_handle *h, const void *buf, size_t count,
                           uint64_t offset,
                           nbd_completion_callback completion_callback,
                           uint32_t flags)
    int64_t nbd_aio_zero(nbd_handle *h, uint64_t count, uint64_t offset,
                         nbd_completion_callback completion_callback,
                         uint32_t flags)
    int nbd_aio_get_fd(nbd_handle *h)
    unsigned nbd_aio_get_direction(nbd_handle *h)
    int nbd_aio_notify_read(nbd_handle *h)
    int nbd_aio_notify_write(nbd_handle *h)
    int nbd_aio_is_negotiating(nbd_handle *h)
    int nbd_aio_is_ready(nbd_handle *h)
    int nbd_aio_is_dead(nbd_handle *h)
    int nbd_aio_is_closed(nbd_handle *h)
    int nbd_aio_command_completed(nbd_handle *h, uint64_t cookie)
    int nbd_aio_in_flight(nbd_handle *h)
    const char *nbd_connection_state(nbd_handle *h)
