# libzstd's streaming decompression API (zstd.h), only what imageio uses.

cdef extern from "zstd.h" nogil:
    ctypedef struct ZSTD_DCtx:
        pass

    ctypedef struct ZSTD_inBuffer:
        const void *src
        size_t size
        size_t pos

    ctypedef struct ZSTD_outBuffer:
        void *dst
        size_t size
        size_t pos

    ctypedef enum ZSTD_dParameter:
        ZSTD_d_windowLogMax

    ZSTD_DCtx *ZSTD_createDCtx()
    size_t ZSTD_freeDCtx(ZSTD_DCtx *dctx)
    size_t ZSTD_DCtx_setParameter(ZSTD_DCtx *dctx, ZSTD_dParameter param,
                                  int value)
    size_t ZSTD_decompressStream(ZSTD_DCtx *zds, ZSTD_outBuffer *output,
                                 ZSTD_inBuffer *input)
    unsigned ZSTD_isError(size_t code)
    const char *ZSTD_getErrorName(size_t code)
