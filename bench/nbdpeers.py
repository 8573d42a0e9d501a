"""NBD pieces of the end-to-end benchmarks (test_e2e_nbd.py,
test_e2e_sparse.py): qemu-nbd exports of the test images, nbdcopy as the NBD
limit, the sparse qcow2 images, the established client's upload, and a
``measure`` that also accounts qemu-nbd's CPU and can set up every round.

Images (cached under /dev/shm/imageio-bench/ while their layout stamp
matches):

- ``nbd-bulk-<N>M.qcow2``: the bulk raw image converted to qcow2 (the data
  segments allocated, the holes not);
- ``nbd-sparse-1t.qcow2``: 1 TiB, 50,000 clusters of 64 KiB (pattern 0x01)
  spread evenly, the rest unallocated (100,000 extents); the same image and
  stamp as bench/test_nbd_micro.py, built here in seconds by writing the
  clusters into a sparse raw file and converting it;
- ``nbd-sparse-100g.qcow2``: 100 GiB with 5,000 such clusters;
- ``upload-src-1t.qcow2``: 1 TiB, 1 GiB of random data in 256 runs of
  4 MiB, one every 4 GiB: the huge sparse image uploaded by the established
  client.

qemu-nbd runs with ``--cache=none --aio=native --shared=8`` (and
``--persistent``), on a unix socket in a work dir of the run, as a child of
the benchmark (it dies with it), stopped by its PID.
"""

import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import time

from harness import nbdserver

from . import cpu, images, peers

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

SHM_DIR = images.SHM_DIR
CLUSTER = 64 * KiB
START_TIMEOUT = 20


# --- images ------------------------------------------------------------------

def _stamped(path, layout):
    try:
        with open(path + ".layout.json") as f:
            return json.load(f) == layout and os.path.exists(path)
    except (OSError, ValueError):
        return False


def _stamp(path, layout):
    with open(path + ".layout.json", "w") as f:
        json.dump(layout, f)


qemu_img = nbdserver.qemu_img


def bulk_qcow2(raw):
    """The bulk raw image as qcow2: same bytes, holes unallocated."""
    name = os.path.basename(raw)
    path = os.path.join(SHM_DIR, "nbd-" + name.rsplit(".", 1)[0] + ".qcow2")
    with open(raw + ".layout.json") as f:
        layout = {"from": name, "raw": json.load(f), "version": 1}
    if _stamped(path, layout):
        return path
    tmp = f"{path}.{os.getpid()}.tmp"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, tmp)
    os.rename(tmp, path)
    _stamp(path, layout)
    return path


class SparseLayout:
    """``clusters`` clusters of 64 KiB filled with ``pattern``, spread
    evenly over ``size`` bytes (one every ``step``), the rest unallocated."""

    def __init__(self, name, size, clusters, pattern=1):
        self.name = name
        self.size = size
        self.clusters = clusters
        self.pattern = pattern
        self.step = (size // clusters) // CLUSTER * CLUSTER
        self.path = os.path.join(SHM_DIR, name)

    def offsets(self):
        return range(0, self.clusters * self.step, self.step)

    @property
    def stamp(self):
        # The stamp of bench/test_nbd_micro.py's 1 TiB image: both build
        # the same bytes, either may reuse the other's.
        return {"size": self.size, "clusters": self.clusters,
                "version": 1}

    def extents(self):
        """Extents a server reports for it: data, zero, data, zero, ..."""
        return 2 * self.clusters if self.step > CLUSTER else 1

    def image(self):
        """Create (or reuse) the qcow2; return its path."""
        if _stamped(self.path, self.stamp):
            return self.path
        os.makedirs(SHM_DIR, exist_ok=True)
        raw = f"{self.path}.raw.{os.getpid()}.tmp"
        fd = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, self.size)
            block = bytes([self.pattern]) * CLUSTER
            for offset in self.offsets():
                os.pwrite(fd, block, offset)
        finally:
            os.close(fd)
        try:
            tmp = f"{self.path}.{os.getpid()}.tmp"
            qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, tmp)
            os.rename(tmp, self.path)
        finally:
            os.unlink(raw)
        _stamp(self.path, self.stamp)
        return self.path

    def checksum(self, block_size=4 * MiB):
        """SPEC.md section 5 block hash (blake2b-256) from the layout, without
        reading 1 TiB: every all-zero block has the same digest."""
        def digest(data):
            return hashlib.blake2b(data, digest_size=32).digest()

        zero = digest(bytes(block_size))
        by_block = {}
        for offset in self.offsets():
            by_block.setdefault(offset // block_size, []).append(offset)
        outer = hashlib.blake2b(digest_size=32)
        nblocks = -(-self.size // block_size)
        for b in range(nblocks):
            start = b * block_size
            length = min(block_size, self.size - start)
            if b in by_block:
                buf = bytearray(length)
                for offset in by_block[b]:
                    n = min(CLUSTER, start + length - offset)
                    buf[offset - start:offset - start + n] = \
                        bytes([self.pattern]) * n
                outer.update(digest(buf))
            elif length == block_size:
                outer.update(zero)
            else:
                outer.update(digest(bytes(length)))
        return outer.hexdigest()


SPARSE_1T = SparseLayout("nbd-sparse-1t.qcow2", TiB, 50000)
SPARSE_100G = SparseLayout("nbd-sparse-100g.qcow2", 100 * GiB, 5000)

# The huge sparse upload source: 1 GiB of data in 1 TiB.
UPLOAD_SIZE = int(os.environ.get("IMAGEIO_BENCH_UPLOAD_SIZE", TiB))
UPLOAD_RUN = 4 * MiB
UPLOAD_RUNS = int(os.environ.get("IMAGEIO_BENCH_UPLOAD_RUNS", 256))


def upload_source():
    """A qcow2 of UPLOAD_SIZE virtual bytes holding UPLOAD_RUNS runs of
    4 MiB of random data spread evenly (1 GiB in 1 TiB by default)."""
    size, runs = UPLOAD_SIZE, UPLOAD_RUNS
    label = f"{size // GiB}g" if size % TiB else f"{size // TiB}t"
    path = os.path.join(SHM_DIR, f"upload-src-{label}.qcow2")
    layout = {"size": size, "runs": runs, "run": UPLOAD_RUN, "seed": 2,
              "version": 1}
    if _stamped(path, layout):
        return path
    os.makedirs(SHM_DIR, exist_ok=True)
    step = (size // runs) // UPLOAD_RUN * UPLOAD_RUN
    rnd = random.Random(2)
    raw = f"{path}.raw.{os.getpid()}.tmp"
    fd = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for i in range(runs):
            os.pwrite(fd, rnd.randbytes(UPLOAD_RUN), i * step)
    finally:
        os.close(fd)
    try:
        tmp = f"{path}.{os.getpid()}.tmp"
        qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, tmp)
        os.rename(tmp, path)
    finally:
        os.unlink(raw)
    _stamp(path, layout)
    return path


def upload_data_size():
    return UPLOAD_RUNS * UPLOAD_RUN


def remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --- qemu-nbd ----------------------------------------------------------------

def _unix_listening(path):
    # A bound listening unix socket has __SO_ACCEPTCON (0x10000) in Flags;
    # connecting to check would make qemu-nbd log a failed handshake.
    with open("/proc/net/unix") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if (len(fields) >= 8 and fields[7] == path
                    and int(fields[3], 16) & 0x10000):
                return True
    return False


class Export:
    """qemu-nbd serving one image on a unix socket.

    Both daemons get the same ``url`` (``nbd:unix:/path.sock``, a form both
    accept); nbdcopy and qemu-img use ``uri`` (``nbd+unix:///?socket=``).
    """

    def __init__(self, image, sock, fmt="qcow2", read_only=False,
                 cache="none", aio="native", shared=8,
                 allocation_depth=False, log=None):
        self.image = image
        self.sock = sock
        self.fmt = fmt
        self.log = log or sock + ".log"
        argv = ["qemu-nbd", "--persistent", f"--shared={shared}",
                "--format", fmt, "--socket", sock]
        if cache:
            argv.append(f"--cache={cache}")
        if aio:
            argv.append(f"--aio={aio}")
        if read_only:
            argv.append("--read-only")
        if allocation_depth:
            argv.append("--allocation-depth")
        argv.append(image)
        self.argv = argv
        self.proc = None

    @property
    def url(self):
        return "nbd:unix:" + self.sock

    @property
    def uri(self):
        return "nbd+unix:///?socket=" + self.sock

    def start(self):
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        if not shutil.which("qemu-nbd"):
            raise peers.Unavailable("qemu-nbd not installed")
        self.proc = peers.spawn(self.argv, self.log)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise peers.Unavailable(
                    f"qemu-nbd exited with {self.proc.returncode}:\n"
                    f"{peers.tail(self.log)}")
            if os.path.exists(self.sock) and _unix_listening(self.sock):
                # qemu-nbd listens before opening the image: a locked or
                # unreadable image makes it exit right after.
                time.sleep(0.05)
                if self.proc.poll() is None:
                    return self
            if time.monotonic() > deadline:
                self.stop()
                raise peers.Unavailable(
                    f"qemu-nbd not ready after {START_TIMEOUT} s:\n"
                    f"{peers.tail(self.log)}")
            time.sleep(0.02)

    def stop(self):
        peers.stop_process(self.proc)
        self.proc = None

    def cpu_seconds(self):
        if self.proc is None:
            return 0.0
        return cpu.process_tree_seconds(self.proc.pid)


def compare(image, fmt, export, timeout=600):
    """``qemu-img compare`` of image with what the export serves; raise
    AssertionError when they differ."""
    res = subprocess.run(
        ["qemu-img", "compare", "-f", fmt, "-F", "raw", image, export.uri],
        capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f"qemu-img compare {image} {export.uri}: exit "
                             f"{res.returncode}: {res.stdout.strip()} "
                             f"{res.stderr.strip()}")


# --- peers that are not daemons ----------------------------------------------

def _children_cpu():
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return c.ru_utime + c.ru_stime


class NbdCopy:
    """nbdcopy, the NBD limit (libnbd, several requests in flight on
    several connections):

    - read: ``nbdcopy --no-extents URI null:``, every byte of the export
      read;
    - write: ``nbdcopy --no-extents -S 0 --flush FILE URI``, every byte of
      the file written (no zero detection), flushed, like a PUT.

    Its CPU is the nbdcopy process's."""

    kind = "nbdcopy"
    label = "nbdcopy --no-extents"

    def __init__(self, export):
        self.export = export

    def read(self, timeout=600):
        subprocess.run(["nbdcopy", "--no-extents", self.export.uri, "null:"],
                       check=True, timeout=timeout)

    def write(self, src, timeout=600):
        subprocess.run(["nbdcopy", "--no-extents", "-S", "0", "--flush", src,
                        self.export.uri], check=True, timeout=timeout)

    def cpu_seconds(self):
        return _children_cpu()


# --- tickets -----------------------------------------------------------------

def nbd_ticket(server, name, url, size, ops=("read",), expect=None,
               **attrs):
    """Give server a ticket named name for the NBD url; when expect is
    (offset, bytes), check a ranged read returns them. A ticket that failed
    once is skipped by the scenarios after it too. Returns the URL path."""
    import pytest
    from . import clients

    added = getattr(server, "_bench_tickets", None)
    if added is None:
        added = server._bench_tickets = {}
    if name in added:
        if added[name] is not None:
            pytest.skip(added[name])
        return server.path(name)
    added[name] = f"{server.kind}: ticket {name} not ready"
    try:
        server.add_ticket(name, None, size=size, ops=ops, url=url, **attrs)
    except (peers.Unavailable, OSError) as e:
        added[name] = f"{server.kind}: cannot add ticket {name}: {e}"
        pytest.skip(added[name])
    path = server.path(name)
    if expect is not None:
        offset, expected = expect
        conn = clients.connect(server, "unix")
        try:
            data = clients.read_range(conn, path, offset, len(expected))
        except (clients.ClientError, OSError) as e:
            added[name] = f"{server.kind}: cannot read {name}: {e}"
            pytest.skip(added[name])
        finally:
            conn.close()
        if data != expected:
            added[name] = f"{server.kind}: {name}: wrong data"
            raise AssertionError(f"{server.label}: {name} at {offset}: "
                                 "wrong data")
    added[name] = None
    return path


# --- the established client --------------------------------------------------

UPLOAD_SCRIPT = """\
import sys
from ovirt_imageio import client
client.upload(sys.argv[1], sys.argv[2], sys.argv[3],
              disk_is_zero=sys.argv[4] == "1")
"""

# ovirt_imageio.client 2.5.1 (client/_io.py): data extents are read and
# PUT in BUFFER_SIZE pieces, zero extents are sent as PATCH zero of at most
# MAX_ZERO_SIZE each.
CLIENT_BUFFER_SIZE = 4 * MiB
CLIENT_MAX_ZERO_SIZE = 128 * MiB


def upload_requests(src):
    """The requests the established client sends to upload src:
    {"PUT": n, "PATCH zero": m} (plus OPTIONS and one PATCH flush per
    connection), from the source's allocation map."""
    extents = json.loads(qemu_img("map", "--output=json", src))
    put = zero = 0
    for e in extents:
        if e["data"]:
            put += -(-e["length"] // CLIENT_BUFFER_SIZE)
        else:
            zero += -(-e["length"] // CLIENT_MAX_ZERO_SIZE)
    return {"PUT": put, "PATCH zero": zero}


def established_python():
    peers.ensure_established()
    return os.path.join(peers.ESTABLISHED_VENV, "bin", "python")


def established_upload(src, url, cafile, timeout, disk_is_zero=False):
    """``ovirt_imageio.client.upload(src, url, cafile)`` with the
    established service's python (2.5.1): extents of the source from its own
    qemu-nbd, PUT for data, PATCH zero (128 MiB at most each) for the
    rest, up to 4 connections. disk_is_zero: skip the zero extents (only
    the data is sent)."""
    res = subprocess.run([established_python(), "-c", UPLOAD_SCRIPT, src,
                          url, cafile, "1" if disk_is_zero else "0"],
                         capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"established client upload to {url}: exit "
                           f"{res.returncode}: {res.stderr.strip()[-2000:]}")


# --- measurement -------------------------------------------------------------

def _client_cpu():
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def measure(benchmark, scenario, server, rep, fn, *, amount, unit="MiB/s",
            cpu_per=None, exports=(), setup=None):
    """bench.e2e.measure, plus:

    exports: qemu-nbd Exports whose CPU per round is stored as
      ``qemu_nbd_cpu`` (same unit as cpu): the NBD server's share;
    setup: called before every round (the warm-up too), not timed: e.g. a
      fresh upload target.

    The server's CPU (``cpu``) is the daemon's only, as in e2e.measure.
    """
    warmup = 1 if rep == 0 else 0
    samples = []

    def nbd_cpu():
        return sum(e.cpu_seconds() for e in exports)

    def one_round():
        c0 = server.cpu_seconds()
        k0 = _client_cpu()
        q0 = nbd_cpu()
        t0 = time.perf_counter()
        fn()
        t = time.perf_counter() - t0
        q = nbd_cpu() - q0
        k = _client_cpu() - k0
        c = server.cpu_seconds() - c0
        samples.append((t, c, k, q))

    benchmark.group = scenario
    benchmark.pedantic(one_round, setup=setup, rounds=1, iterations=1,
                       warmup_rounds=warmup)
    t, c, k, q = samples[-1]
    if unit == "s":
        value, higher = t, False
    else:
        value, higher = amount / t, True
    if cpu_per is None:
        cpu_per = (amount / 1024, "s/GiB") if unit == "MiB/s" else (1, "s")
    divisor, cpu_unit = cpu_per
    info = benchmark.extra_info
    info.update({
        "scenario": scenario,
        "server": server.kind,
        "label": server.label,
        "rep": rep,
        "unit": unit,
        "higher_is_better": higher,
        "value": value,
        "seconds": t,
        "cpu": c / divisor,
        "client_cpu": k / divisor,
        "cpu_unit": cpu_unit,
    })
    if exports:
        info["qemu_nbd_cpu"] = q / divisor
    return info


def discard(benchmark, reason):
    """Fail a measured round whose result turned out wrong: pytest-benchmark
    leaves a benchmark with an error out of the JSON, so the report shows no
    numbers of a fast but wrong server, only the failure."""
    benchmark.has_error = True
    raise AssertionError(reason)
