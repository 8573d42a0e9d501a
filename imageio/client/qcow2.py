"""A new qcow2 image laid out for the data a download will write.

A download knows the daemon's data extents before it moves a byte, so the
whole image can be laid out at once: header, refcount table and blocks,
L1 table, the L2 tables that map data, then one host cluster per guest
cluster holding data, in guest order.  The client then writes each data
item at its host offset itself (``Layout.runs``), as the daemon writes a
raw file: no qemu-nbd receiving every byte and writing it again (through
qemu-nbd, a 2 GiB download holding 1 GiB cost the client and qemu-nbd
1.15 CPU-s; perf: four copies of every byte).  Clusters never written
read as zeroes (the file is sparse), so an interrupted download leaves a
valid image.  qemu reads the result like any other (``qemu-img check``
finds nothing; the verification's read-back maps it with ``qemu-img
map``, so a wrong layout fails the download).

Version 3 (compat 1.1), 64 KiB clusters, 16-bit refcounts, no backing
file, no extensions: what ``qemu-img create -f qcow2`` makes, but for the
allocation.
"""

import array
import os
import struct
import sys

CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
L2_ENTRIES = CLUSTER // 8
REFCOUNT_ORDER = 4
REFCOUNTS_PER_BLOCK = CLUSTER * 8 // (1 << REFCOUNT_ORDER)
COPIED = 1 << 63
HEADER_LENGTH = 104


def data_clusters(extents):
    """Runs ``(first, count)`` of guest clusters holding any byte of the
    ``(start, length)`` data extents (in order)."""
    runs = []
    for start, length in extents:
        if length <= 0:
            continue
        first = start // CLUSTER
        last = (start + length - 1) // CLUSTER
        if runs and runs[-1][0] + runs[-1][1] > first:
            # Shares a cluster with (or overlaps) the previous run.
            first = runs[-1][0] + runs[-1][1]
            if first > last:
                continue
        if runs and runs[-1][0] + runs[-1][1] == first:
            runs[-1][1] += last - first + 1
        else:
            runs.append([first, last - first + 1])
    return [tuple(r) for r in runs]


class Layout:
    """Where everything of the image lies (host clusters, in order):
    header, refcount table, refcount blocks, L1 table, L2 tables, data.
    ``runs``: ``(guest_start, length, host_offset)`` of each run of data
    clusters."""

    def __init__(self, size, extents):
        # qemu's sizes are whole 512-byte sectors (qemu-img create rounds
        # up the same way).
        self.size = size = -(-size // 512) * 512
        clusters = data_clusters(extents)
        self.l1_size = max(1, -(-size // (CLUSTER * L2_ENTRIES)))
        self.l1_clusters = -(-self.l1_size * 8 // CLUSTER)
        tables = sorted({c // L2_ENTRIES for first, n in clusters
                         for c in _l2_span(first, n)})
        self.l2_index = {t: i for i, t in enumerate(tables)}
        ndata = sum(n for _, n in clusters)
        # The refcount blocks count every cluster, themselves included.
        blocks, rt = 1, 1
        while True:
            total = 1 + rt + blocks + self.l1_clusters + len(tables) + ndata
            need = -(-total // REFCOUNTS_PER_BLOCK)
            need_rt = -(-need * 8 // CLUSTER)
            if need == blocks and need_rt == rt:
                break
            blocks, rt = need, need_rt
        self.total = total
        self.refcount_table = 1 * CLUSTER
        self.refcount_table_clusters = rt
        self.refcount_blocks = (1 + rt) * CLUSTER
        self.nblocks = blocks
        self.l1_table = (1 + rt + blocks) * CLUSTER
        self.l2_tables = self.l1_table + self.l1_clusters * CLUSTER
        data = self.l2_tables + len(tables) * CLUSTER
        self.runs = []
        for first, n in clusters:
            self.runs.append((first * CLUSTER, n * CLUSTER, data))
            data += n * CLUSTER
        self._clusters = clusters

    def header(self):
        h = struct.pack(
            ">4sIQIIQIIQQIIQQQQII",
            b"QFI\xfb", 3,          # magic, version
            0, 0,                   # backing file offset, size
            CLUSTER_BITS, self.size,
            0,                      # crypt method
            self.l1_size, self.l1_table,
            self.refcount_table, self.refcount_table_clusters,
            0, 0,                   # snapshots
            0, 0, 0,                # incompatible, compatible, autoclear
            REFCOUNT_ORDER, HEADER_LENGTH)
        assert len(h) == HEADER_LENGTH
        # Then the header extensions: none, the end marker (zeroes).
        return h + bytes(8)

    def write(self, fd):
        """Write the metadata into the empty file ``fd`` and size it; the
        data clusters stay holes until the download writes them."""
        os.ftruncate(fd, self.total * CLUSTER)
        _pwrite_all(fd, self.header(), 0)
        table = b"".join(struct.pack(">Q", self.refcount_blocks + i * CLUSTER)
                         for i in range(self.nblocks))
        _pwrite_all(fd, table, self.refcount_table)
        one = struct.pack(">H", 1)
        left = self.total
        for i in range(self.nblocks):
            n = min(left, REFCOUNTS_PER_BLOCK)
            _pwrite_all(fd, one * n, self.refcount_blocks + i * CLUSTER)
            left -= n
        l1 = bytearray(self.l1_size * 8)
        for t, i in self.l2_index.items():
            struct.pack_into(">Q", l1, t * 8,
                             (self.l2_tables + i * CLUSTER) | COPIED)
        _pwrite_all(fd, l1, self.l1_table)
        # One L2 table at a time (a 1 TiB image has 2048 of 64 KiB), each
        # run's entries made in C (consecutive host offsets, big-endian).
        table, index = None, None
        for (first, n), (_, _, host) in zip(self._clusters, self.runs):
            c = first
            while c < first + n:
                t = c // L2_ENTRIES
                if t != index:
                    if table is not None:
                        self._write_l2(fd, index, table)
                    table, index = bytearray(CLUSTER), t
                k = min(first + n, (t + 1) * L2_ENTRIES) - c
                h = COPIED + host + (c - first) * CLUSTER
                entries = array.array("Q", range(h, h + k * CLUSTER,
                                                 CLUSTER))
                if sys.byteorder == "little":
                    entries.byteswap()
                at = (c % L2_ENTRIES) * 8
                table[at:at + k * 8] = entries.tobytes()
                c += k
        if table is not None:
            self._write_l2(fd, index, table)

    def _write_l2(self, fd, t, table):
        _pwrite_all(fd, table, self.l2_tables + self.l2_index[t] * CLUSTER)


def _l2_span(first, n):
    """One guest cluster per L2 table the run ``first, n`` touches."""
    c = first
    while c < first + n:
        yield c
        c = (c // L2_ENTRIES + 1) * L2_ENTRIES


def _pwrite_all(fd, data, offset):
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def create(filename, size, extents):
    """Create ``filename`` (replacing it) laid out for the data
    ``extents``; return its Layout."""
    layout = Layout(size, extents)
    fd = os.open(filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC |
                 os.O_CLOEXEC, 0o644)
    try:
        layout.write(fd)
        os.fsync(fd)
    finally:
        os.close(fd)
    return layout
