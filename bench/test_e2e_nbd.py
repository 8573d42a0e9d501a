"""End-to-end benchmarks of the NBD backend, our daemon side by side with
the established ovirt-imageio 2.5.1 serving the same export in the same run
(TARGETS.md "Bulk transfer" nbd rows, extents and checksum of the 1 TiB
sparse qcow2), and nbdcopy reading (GET) or writing (PUT) the same export:
the NBD limit.

Exports are qemu-nbd ``--cache=none --aio=native --shared=8`` serving qcow2
images on /dev/shm (bench/nbdpeers.py); both daemons get the same ticket URL
``nbd:unix:/path.sock``. CPU is the daemon's (``qemu_nbd_cpu`` in
extra_info is qemu-nbd's share, per GiB too).

Checksum: the established service reads and hashes in full every 4 MiB
block that holds data (169-439 s for the 1 TiB qcow2 here, whose 50,000
clusters fall in 50,000 blocks), so the routine scenario is
``nbd_checksum_100g`` (100 GiB, 5,000 clusters, 2 repeats); the 1 TiB one
runs once per server with IMAGEIO_BENCH_CHECKSUM_1T=1 (5-10 minutes).
"""

import os
import shutil
import tempfile

import pytest

from bench import clients, images, nbdpeers
from bench.e2e import *  # noqa: F401,F403 (fixtures)
from bench.e2e import MiB, ONLY, get_server, servers_param, ticket
from bench.nbdpeers import measure

DAEMONS = ["imageio", "established"]
GET_PEERS = ["imageio", "established", "nbdcopy"]
PUT_PEERS = GET_PEERS

CHECKSUM_REPEATS = int(os.environ.get("IMAGEIO_BENCH_CHECKSUM_REPEATS", 2))
CHECKSUM_1T = bool(os.environ.get("IMAGEIO_BENCH_CHECKSUM_1T"))
# Bounds: a daemon slower than this produces no number (reported).
CHECKSUM_100G_TIMEOUT = 600
CHECKSUM_1T_TIMEOUT = 1200
EXTENTS_TIMEOUT = 300

pytestmark = pytest.mark.skipif(
    not shutil.which("qemu-nbd") or not shutil.which("nbdcopy"),
    reason="qemu-nbd and nbdcopy needed (apt-get install qemu-utils "
    "libnbd-bin)")



# --- exports -----------------------------------------------------------------

@pytest.fixture(scope="session")
def nbd_dir():
    d = tempfile.mkdtemp(prefix="imageio-bench-nbd-")
    yield d
    if not os.environ.get("IMAGEIO_BENCH_KEEP"):
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def bulk():
    return images.bulk_image()


def _export(nbd_dir, name, image, **kw):
    try:
        return nbdpeers.Export(image, os.path.join(nbd_dir, name + ".sock"),
                               **kw).start()
    except nbdpeers.peers.Unavailable as e:
        pytest.skip(f"qemu-nbd for {name}: {e}")


@pytest.fixture(scope="session")
def bulk_export(nbd_dir, bulk):
    """The bulk image as qcow2, read-only."""
    e = _export(nbd_dir, "bulk", nbdpeers.bulk_qcow2(bulk), read_only=True)
    yield e
    e.stop()


@pytest.fixture(scope="session")
def put_export(nbd_dir, bulk):
    """An empty qcow2 of the bulk image's size; every PUT overwrites all of
    it (the servers take turns)."""
    # One per run (pid): runs at the same time must not share a target.
    path = os.path.join(images.SHM_DIR,
                        f"nbd-put-{os.path.getsize(bulk) // MiB}M-"
                        f"{os.getpid()}.qcow2")
    nbdpeers.qemu_img("create", "-f", "qcow2", path,
                      os.path.getsize(bulk))
    e = _export(nbd_dir, "put", path)
    yield e
    e.stop()
    nbdpeers.remove(path)


@pytest.fixture(scope="session")
def sparse_1t_export(nbd_dir):
    e = _export(nbd_dir, "sparse-1t", nbdpeers.SPARSE_1T.image(),
                read_only=True, allocation_depth=True)
    yield e
    e.stop()


@pytest.fixture(scope="session")
def sparse_100g_export(nbd_dir):
    e = _export(nbd_dir, "sparse-100g", nbdpeers.SPARSE_100G.image(),
                read_only=True, allocation_depth=True)
    yield e
    e.stop()


def _peer(request, servers, export):
    if request.param == "nbdcopy":
        if ONLY and "nbdcopy" not in ONLY:
            pytest.skip("nbdcopy not selected (IMAGEIO_BENCH_SERVERS)")
        return nbdpeers.NbdCopy(export)
    return get_server(servers, request.param)


@pytest.fixture
def nbd_get_peer(request, servers, bulk_export):
    return _peer(request, servers, bulk_export)


@pytest.fixture
def nbd_put_peer(request, servers, put_export):
    return _peer(request, servers, put_export)


def _bulk_ticket(server, bulk, export):
    # The same bytes as the raw bulk image: ticket() checks a ranged read
    # against it.
    return ticket(server, "nbd-bulk", bulk, url=export.url)


# --- bulk GET and PUT --------------------------------------------------------

def _get(benchmark, servers, peer, rep, bulk, export, transport, scenario):
    size = os.path.getsize(bulk)
    if peer.kind == "nbdcopy":
        fn = peer.read
    else:
        path = _bulk_ticket(peer, bulk, export)

        def fn():
            assert clients.curl_get(peer, path, transport,
                                    servers.cert) == size

    measure(benchmark, scenario, peer, rep, fn, amount=size / MiB,
            exports=[export])


@servers_param(GET_PEERS, argname="nbd_get_peer")
def test_nbd_get_unix(benchmark, servers, nbd_get_peer, rep, bulk,
                      bulk_export):
    """GET the 2 GiB half-sparse qcow2 through NBD over the unix socket;
    nbdcopy reads every byte of the same export to null:."""
    _get(benchmark, servers, nbd_get_peer, rep, bulk, bulk_export, "unix",
         "nbd_get_unix")


@servers_param(GET_PEERS, argname="nbd_get_peer")
def test_nbd_get_https(benchmark, servers, nbd_get_peer, rep, bulk,
                       bulk_export):
    """GET the same through NBD over HTTPS (nbdcopy: the same NBD limit)."""
    _get(benchmark, servers, nbd_get_peer, rep, bulk, bulk_export, "https",
         "nbd_get_https")


def _put(benchmark, servers, server, rep, bulk, export, transport,
         scenario):
    size = os.path.getsize(bulk)
    if server.kind == "nbdcopy":
        def put():
            server.write(bulk)
    else:
        path = ticket(server, "nbd-put", bulk, ops=("write",),
                      url=export.url)

        def put():
            assert clients.curl_put(server, path, transport, bulk,
                                    servers.cert) == size

    measure(benchmark, scenario, server, rep, put, amount=size / MiB,
            exports=[export])
    if rep == 0:
        # What this server just wrote (the servers take turns).
        try:
            nbdpeers.compare(bulk, "raw", export)
        except AssertionError as e:
            nbdpeers.discard(benchmark, f"{server.label}: {e}")


@servers_param(PUT_PEERS, argname="nbd_put_peer")
def test_nbd_put_unix(benchmark, servers, nbd_put_peer, rep, bulk,
                      put_export):
    """PUT the 2 GiB image into a qcow2 through NBD over the unix socket
    (flush=y); nbdcopy writes every byte of the same file to the same
    export."""
    _put(benchmark, servers, nbd_put_peer, rep, bulk, put_export, "unix",
         "nbd_put_unix")


@servers_param(PUT_PEERS, argname="nbd_put_peer")
def test_nbd_put_https(benchmark, servers, nbd_put_peer, rep, bulk,
                       put_export):
    """PUT the same over HTTPS."""
    _put(benchmark, servers, nbd_put_peer, rep, bulk, put_export, "https",
         "nbd_put_https")


# --- extents and checksum of sparse qcow2 images -----------------------------

def _sparse_ticket(server, layout, export):
    # The first cluster holds the pattern: a ranged read inside it.
    return nbdpeers.nbd_ticket(
        server, layout.name, export.url, layout.size,
        expect=(12345, bytes([layout.pattern]) * 4096))


@servers_param(DAEMONS)
def test_nbd_extents_1t(benchmark, servers, server, rep, sparse_1t_export):
    """GET /images/ID/extents of the 1 TiB qcow2 with 50,000 scattered
    64 KiB clusters (100,000 extents), over the unix socket (time)."""
    layout = nbdpeers.SPARSE_1T
    path = _sparse_ticket(server, layout, sparse_1t_export)
    conn = clients.connect(server, "unix", timeout=EXTENTS_TIMEOUT)
    got = []
    try:
        def extents():
            got[:] = clients.get_json(conn, path + "/extents")

        measure(benchmark, "nbd_extents_1t", server, rep, extents, amount=1,
                unit="s", cpu_per=(1, "s"), exports=[sparse_1t_export])
    finally:
        conn.close()
    data = [e for e in got if not e["zero"]]
    if (len(got) != layout.extents() or len(data) != layout.clusters
            or sum(e["length"] for e in got) != layout.size
            or [e["start"] for e in data] != list(layout.offsets())):
        nbdpeers.discard(benchmark, f"{server.label}: wrong extents: "
                         f"{len(got)} extents, {len(data)} data")
    benchmark.extra_info["extents"] = len(got)


def _checksum(benchmark, servers, server, rep, layout, export, scenario,
              timeout):
    path = _sparse_ticket(server, layout, export)
    expected = layout.checksum()
    conn = clients.connect(server, "unix", timeout=timeout)
    try:
        def checksum():
            res = clients.get_json(conn, path + "/checksum")
            assert res["checksum"] == expected, res

        try:
            measure(benchmark, scenario, server, rep, checksum, amount=1,
                    unit="s", cpu_per=(1, "s"), exports=[export])
        except TimeoutError:
            pytest.skip(f"{server.label}: {scenario} took more than "
                        f"{timeout} s")
    finally:
        conn.close()


@servers_param(DAEMONS, repeats=CHECKSUM_REPEATS)
def test_nbd_checksum_100g(benchmark, servers, server, rep,
                           sparse_100g_export):
    """Checksum of a 100 GiB qcow2 with 5,000 scattered 64 KiB clusters
    through NBD (time; the 1 TiB image takes the established service
    ~7 minutes: see nbd_checksum_1t)."""
    _checksum(benchmark, servers, server, rep, nbdpeers.SPARSE_100G,
              sparse_100g_export, "nbd_checksum_100g", CHECKSUM_100G_TIMEOUT)


@servers_param(DAEMONS, repeats=1)
def test_nbd_checksum_1t(benchmark, servers, server, rep, sparse_1t_export):
    """Checksum of the 1 TiB qcow2 with 50,000 clusters, once per server,
    without a warm-up (IMAGEIO_BENCH_CHECKSUM_1T=1)."""
    if not CHECKSUM_1T:
        pytest.skip("nbd_checksum_1t: the established service needs ~7 "
                    "minutes; set IMAGEIO_BENCH_CHECKSUM_1T=1")
    _checksum(benchmark, servers, server, 1, nbdpeers.SPARSE_1T,
              sparse_1t_export, "nbd_checksum_1t", CHECKSUM_1T_TIMEOUT)
