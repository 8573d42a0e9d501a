"""Upload of a huge sparse image by the established client library, to our
daemon and to the established ovirt-imageio 2.5.1 in the same run
(TARGETS.md: "time bounded by the data, not the virtual size: <= 0.2x
established").

The source is a 1 TiB qcow2 holding 1 GiB of random data in 256 runs of
4 MiB, one every 4 GiB (bench/nbdpeers.py). The client is
``ovirt_imageio.client.upload`` run with the python of
bench/.venv-established: it reads the source's extents through its own
qemu-nbd, PUTs the data in 4 MiB requests and sends ``PATCH {"op": "zero"}``
for everything else, split into requests of at most 128 MiB: 256 PUTs and
8,192 PATCH zero requests for this image (``requests`` in extra_info), on up
to 4 connections (the unix socket, which both daemons offer).

The target is a fresh empty 1 TiB qcow2 on /dev/shm for every round,
served by qemu-nbd ``--cache=none --aio=native --shared=8``, behind a
ticket with ``sparse: true`` (a thin disk, what a huge sparse image is
uploaded to; IMAGEIO_BENCH_UPLOAD_SPARSE=0 for a preallocated one). Every
measured upload is checked with ``qemu-img compare`` against the source.

Peers:

- established: the same upload to the established service;
- data-only: the same client uploading to our daemon with
  ``disk_is_zero=True`` (zero extents skipped, only the 256 PUTs): the floor
  of an upload whose time is bounded by its data. Its ratio (data-only time
  / our time) says how much of our upload is spent on the zeroes.
"""

import os
import shutil
import subprocess
import tempfile

import pytest

from bench import images, nbdpeers
from bench.e2e import *  # noqa: F401,F403 (fixtures)
from bench.e2e import ONLY, OURS, QUICK, get_server, servers_param
from bench.nbdpeers import measure

PEERS = ["imageio", "established", "data-only"]

UPLOAD_REPEATS = int(os.environ.get("IMAGEIO_BENCH_UPLOAD_REPEATS",
                                    2 if QUICK else 3))
UPLOAD_TIMEOUT = int(os.environ.get("IMAGEIO_BENCH_UPLOAD_TIMEOUT", 900))
UPLOAD_SPARSE = os.environ.get("IMAGEIO_BENCH_UPLOAD_SPARSE", "1") != "0"

pytestmark = pytest.mark.skipif(
    not shutil.which("qemu-nbd"),
    reason="qemu-nbd needed (apt-get install qemu-utils)")



@pytest.fixture(scope="session")
def upload_src():
    return nbdpeers.upload_source()


@pytest.fixture(scope="session")
def upload_requests(upload_src):
    return nbdpeers.upload_requests(upload_src)


class Target:
    """A fresh empty qcow2 of the source's virtual size, re-created and
    re-exported before every round."""

    def __init__(self, workdir):
        # One per run (pid): runs at the same time must not share it.
        self.path = os.path.join(images.SHM_DIR,
                                 f"upload-target-{os.getpid()}.qcow2")
        self.export = nbdpeers.Export(
            self.path, os.path.join(workdir, "upload-target.sock"))

    def reset(self):
        self.export.stop()
        nbdpeers.qemu_img("create", "-f", "qcow2", self.path,
                          nbdpeers.UPLOAD_SIZE)
        self.export.start()

    def close(self):
        self.export.stop()
        nbdpeers.remove(self.path)


@pytest.fixture(scope="session")
def upload_target():
    d = tempfile.mkdtemp(prefix="imageio-bench-upload-")
    t = Target(d)
    yield t
    t.close()
    shutil.rmtree(d, ignore_errors=True)


class DataOnly:
    """Our daemon, uploaded to by the client with disk_is_zero=True."""

    kind = "data-only"
    label = "imageio, data only (client skips zeroes)"
    disk_is_zero = True

    def __init__(self, daemon):
        self.daemon = daemon
        self.https = daemon.https
        self.unix_socket = daemon.unix_socket

    def add_ticket(self, name, *args, **kw):
        return self.daemon.add_ticket(name, *args, **kw)

    def path(self, name):
        return self.daemon.path(name)

    def cpu_seconds(self):
        return self.daemon.cpu_seconds()


@pytest.fixture
def upload_peer(request, servers):
    if request.param == "data-only":
        if ONLY and "data-only" not in ONLY and OURS not in ONLY:
            pytest.skip("data-only not selected (IMAGEIO_BENCH_SERVERS)")
        return DataOnly(get_server(servers, OURS))
    return get_server(servers, request.param)


@servers_param(PEERS, argname="upload_peer", repeats=UPLOAD_REPEATS)
def test_sparse_upload_1t(benchmark, servers, upload_peer, rep, upload_src,
                          upload_target, upload_requests):
    """ovirt_imageio.client.upload of the 1 TiB qcow2 with 1 GiB of data
    into a qcow2 through NBD (time, lower is better)."""
    peer = upload_peer
    disk_is_zero = getattr(peer, "disk_is_zero", False)
    state = {"round": 0}

    def setup():
        upload_target.reset()
        # A new ticket per round: the target's qemu-nbd is new too.
        name = f"upload-{peer.kind}-{rep}-{state['round']}"
        state["round"] += 1
        path = nbdpeers.nbd_ticket(
            peer, name, upload_target.export.url, nbdpeers.UPLOAD_SIZE,
            ops=("write",), sparse=UPLOAD_SPARSE)
        host, port = peer.https
        state["url"] = f"https://{host}:{port}{path}"

    def upload():
        nbdpeers.established_upload(upload_src, state["url"], servers.cert,
                                    UPLOAD_TIMEOUT, disk_is_zero=disk_is_zero)

    try:
        measure(benchmark, "sparse_upload_1t", peer, rep, upload, amount=1,
                unit="s", cpu_per=(1, "s"), exports=[upload_target.export],
                setup=setup)
    except subprocess.TimeoutExpired:
        pytest.skip(f"{peer.label}: the upload took more than "
                    f"{UPLOAD_TIMEOUT} s")
    requests = dict(upload_requests)
    if disk_is_zero:
        requests["PATCH zero"] = 0
    benchmark.extra_info.update({
        "virtual_size": nbdpeers.UPLOAD_SIZE,
        "data_size": nbdpeers.upload_data_size(),
        "sparse_ticket": UPLOAD_SPARSE,
        "requests": requests,
    })
    try:
        nbdpeers.compare(upload_src, "qcow2", upload_target.export)
    except AssertionError as e:
        nbdpeers.discard(benchmark, f"{peer.label}: {e}")
