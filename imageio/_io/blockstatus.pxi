# Block status.
# Included by nbd.pyx (its cimports and constants are in scope).

cdef enum CombineKind:
    COMBINE_RAW     # out |= value
    COMBINE_BIT     # out |= bit if value & mask
    COMBINE_ZERO    # out |= bit if value == 0

cdef struct Context:
    const char *name
    CombineKind kind
    uint32_t mask
    uint32_t bit
    uint32_t *entries       # (length, flags) pairs from the last reply
    size_t n                # uint32 values in entries
    size_t cap
    bint seen

cdef struct Walk:
    int n
    Context ctx[MAX_CONTEXTS]
    # Merged output: start, length, flags.
    uint64_t *out
    size_t nout
    size_t capout
    int err


cdef int _extent_cb(void *user_data, const char *metacontext,
                    uint64_t offset, uint32_t *entries, size_t nr_entries,
                    int *error) noexcept nogil:
    cdef Walk *w = <Walk *>user_data
    cdef Context *c
    cdef uint32_t *p
    cdef int i
    for i in range(w.n):
        c = &w.ctx[i]
        if strcmp(metacontext, c.name) != 0:
            continue
        if c.seen:
            # A buggy server answering twice: keep the first.
            return 0
        c.seen = True
        nr_entries -= nr_entries % 2
        if nr_entries > c.cap:
            p = <uint32_t *>realloc(c.entries, nr_entries * sizeof(uint32_t))
            if p == NULL:
                w.err = ENOMEM
                error[0] = ENOMEM
                return -1
            c.entries = p
            c.cap = nr_entries
        memcpy(c.entries, entries, nr_entries * sizeof(uint32_t))
        c.n = nr_entries
        return 0
    return 0


cdef int _emit(Walk *w, uint64_t start, uint64_t length, uint32_t flags) noexcept nogil:
    cdef uint64_t *p
    cdef size_t last
    if w.nout > 0:
        last = (w.nout - 1) * 3
        if w.out[last + 2] == flags and w.out[last] + w.out[last + 1] == start:
            w.out[last + 1] += length
            return 0
    if w.nout == w.capout:
        w.capout = w.capout * 2 if w.capout else 1024
        p = <uint64_t *>realloc(w.out, w.capout * 3 * sizeof(uint64_t))
        if p == NULL:
            return -1
        w.out = p
    w.out[w.nout * 3] = start
    w.out[w.nout * 3 + 1] = length
    w.out[w.nout * 3 + 2] = flags
    w.nout += 1
    return 0


cdef inline uint32_t _combine(Context *c, uint32_t value) noexcept nogil:
    if c.kind == COMBINE_RAW:
        return value
    if c.kind == COMBINE_BIT:
        return c.bit if value & c.mask else 0
    return c.bit if value == 0 else 0


cdef int _walk(lib.nbd_handle *h, Walk *w, uint64_t offset, uint64_t length,
               Failure *f) noexcept nogil:
    """Walk block status of [offset, offset + length) for w's contexts."""
    cdef uint64_t end = offset + length
    cdef uint64_t count, covered, adv, pos, seg, sum_
    cdef uint64_t rem[MAX_CONTEXTS]
    cdef size_t idx[MAX_CONTEXTS]
    cdef lib.nbd_extent_callback cb
    cdef uint32_t flags
    cdef int i, r
    cdef size_t k
    cb.callback = _extent_cb
    cb.user_data = w
    cb.free = NULL
    while offset < end:
        count = end - offset
        if count > MAX_BLOCK_STATUS:
            count = MAX_BLOCK_STATUS
        for i in range(w.n):
            w.ctx[i].seen = False
            w.ctx[i].n = 0
        r = lib.nbd_block_status(h, count, offset, cb, 0)
        if r == -1:
            if w.err:
                _fail(f, FAIL_OS, w.err, "Out of memory")
            else:
                _fail_nbd(f)
            return -1
        # Advance by what every context covered.
        adv = count
        for i in range(w.n):
            sum_ = 0
            k = 0
            while k < w.ctx[i].n and sum_ < count:
                sum_ += w.ctx[i].entries[k]
                k += 2
            if sum_ < adv:
                adv = sum_
            rem[i] = w.ctx[i].entries[0] if w.ctx[i].n else 0
            idx[i] = 0
        if adv == 0:
            _fail(f, FAIL_PROTOCOL, EPROTO,
                  "NBD server returned no block status")
            return -1
        pos = offset
        while pos < offset + adv:
            seg = offset + adv - pos
            flags = 0
            for i in range(w.n):
                # Skip zero-length entries a server may send.
                while rem[i] == 0:
                    idx[i] += 2
                    rem[i] = w.ctx[i].entries[idx[i]]
                if rem[i] < seg:
                    seg = rem[i]
                flags |= _combine(&w.ctx[i], w.ctx[i].entries[idx[i] + 1])
            if _emit(w, pos, seg, flags) < 0:
                _fail(f, FAIL_OS, ENOMEM, "Out of memory")
                return -1
            for i in range(w.n):
                rem[i] -= seg
            pos += seg
        offset += adv
    return 0


cdef struct Names:
    char **names
    size_t n


cdef int _list_cb(void *user_data, const char *name) noexcept nogil:
    cdef Names *names = <Names *>user_data
    cdef char **p
    cdef size_t size = strlen(name) + 1
    cdef char *copy = <char *>realloc(NULL, size)
    if copy == NULL:
        return 0
    memcpy(copy, name, size)
    p = <char **>realloc(names.names, (names.n + 1) * sizeof(char *))
    if p == NULL:
        free(copy)
        return 0
    names.names = p
    names.names[names.n] = copy
    names.n += 1
    return 0
