"""End-to-end transfers with the project's own client (TARGETS.md "End-to-end
transfers with the project's own client"), for the report and the CI gate.

The source: a qcow2 of IMAGEIO_BENCH_SIZE bytes (2 GiB; 1 GiB in the gate)
with about half random data in runs of 1-16 MiB, on /dev/shm
(bench/client.py). Scenarios (time, lower is better):

- client_upload: the qcow2 to a sparse raw file ticket;
- client_download: a raw file ticket holding the same guest data, to a new
  qcow2.

Peers, interleaved round by round:

- imageio: ``ovirt-img`` + this daemon, the default command line
  (verification on): what the ratios and their floors use;
- imageio-no-verify: the same with ``--no-verify``, an extra row (no
  floor);
- established: ``ovirt_imageio.client`` 2.5.1 + the established daemon;
- qemu-img: ``qemu-img convert`` of the qcow2 to raw locally (no daemon),
  the limit of the pipe: TARGETS.md asks for at most 2x its time.

Both clients may use their daemon's unix socket (same host). Every result
is checked with ``qemu-img compare``.
"""

import os
import shutil
import subprocess
import tempfile

import pytest

from bench import client as clientbench
from bench import images
from bench.e2e import *  # noqa: F401,F403 (fixtures)
from bench.e2e import ONLY, OURS, get_server, servers_param
from bench.nbdpeers import discard, measure

PEERS = ["imageio", "imageio-no-verify", "established", "qemu-img"]


class QemuImg:
    """``qemu-img convert`` locally: a peer without a daemon."""

    kind = "qemu-img"
    label = "qemu-img convert (local)"

    def cpu_seconds(self):
        return 0.0



class NoVerify:
    """``ovirt-img --no-verify`` + this daemon: the daemon's peer, another
    row."""

    kind = "imageio-no-verify"
    label = "ovirt-img --no-verify + this daemon"

    def __init__(self, server):
        self._server = server

    def __getattr__(self, name):
        return getattr(self._server, name)


@pytest.fixture
def peer(request, servers):
    if request.param == "imageio-no-verify":
        return NoVerify(get_server(servers, OURS))
    if request.param == "qemu-img":
        if ONLY and "qemu-img" not in ONLY and OURS not in ONLY:
            pytest.skip("qemu-img not selected (IMAGEIO_BENCH_SERVERS)")
        return QemuImg()
    return get_server(servers, request.param)


@pytest.fixture(scope="session")
def client_src():
    return clientbench.source_image(images.BULK_SIZE)


@pytest.fixture(scope="session")
def client_tmp():
    d = tempfile.mkdtemp(prefix="client-", dir=images.SHM_DIR)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def served_raw(client_src, client_tmp):
    """The source's guest data as a raw file, served by download tickets."""
    path = os.path.join(client_tmp, "served.raw")
    clientbench.qemu_img("convert", "-f", "qcow2", "-O", "raw", client_src,
                         path)
    return path


def _url(server, name):
    host, port = server.https
    return f"https://{host}:{port}{server.path(name)}"


def _client(servers, peer, op, url, path):
    if peer.kind == "established":
        python = os.path.join(os.path.dirname(
            clientbench.peers.ensure_established()), "python")
        argv = [python, "-c", clientbench.ESTABLISHED_SCRIPT, op, url, path,
                servers.cert]
    else:
        argv = [clientbench.OVIRT_IMG, op]
        argv += [path, url] if op == "upload" else [url, path]
        argv += ["--cafile", servers.cert, "-o", "json"]
        if peer.kind == "imageio-no-verify":
            argv.append("--no-verify")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"{peer.label} {op}: {r.stderr.strip()[-2000:]}")


@servers_param(PEERS, argname="peer")
def test_client_upload(benchmark, servers, peer, rep, client_src,
                       client_tmp):
    """Upload of the qcow2 to a sparse raw file ticket (time, s)."""
    size = images.BULK_SIZE
    target = os.path.join(client_tmp, f"upload-{peer.kind}.raw")
    state = {"round": 0}

    def setup():
        if os.path.exists(target):
            os.unlink(target)
        with open(target, "wb") as f:
            f.truncate(size)
        if peer.kind != "qemu-img":
            name = f"client-up-{peer.kind}-{rep}-{state['round']}"
            state["round"] += 1
            peer.add_ticket(name, target, size=size, ops=("read", "write"),
                            sparse=True)
            state["url"] = _url(peer, name)

    def upload():
        if peer.kind == "qemu-img":
            clientbench.qemu_img("convert", "-f", "qcow2", "-O", "raw",
                                 client_src, target)
        else:
            _client(servers, peer, "upload", state["url"], client_src)

    measure(benchmark, "client_upload", peer, rep, upload, amount=1,
            unit="s", cpu_per=(1, "s"), setup=setup)
    try:
        clientbench._compare(client_src, "qcow2", target, "raw")
    except RuntimeError as e:
        discard(benchmark, f"{peer.label}: {e}")
    finally:
        os.unlink(target)


@servers_param(PEERS, argname="peer")
def test_client_download(benchmark, servers, peer, rep, client_src,
                         client_tmp, served_raw):
    """Download of a raw file ticket to a new qcow2 (time, s)."""
    size = images.BULK_SIZE
    out = os.path.join(client_tmp, f"download-{peer.kind}.qcow2")
    state = {"round": 0}

    def setup():
        if os.path.exists(out):
            os.unlink(out)
        if peer.kind != "qemu-img":
            name = f"client-down-{peer.kind}-{rep}-{state['round']}"
            state["round"] += 1
            peer.add_ticket(name, served_raw, size=size, ops=("read",))
            state["url"] = _url(peer, name)

    def download():
        if peer.kind == "qemu-img":
            # The limit: the same qcow2 to raw, locally.
            clientbench.qemu_img("convert", "-f", "qcow2", "-O", "raw",
                                 client_src, out)
        else:
            _client(servers, peer, "download", state["url"], out)

    measure(benchmark, "client_download", peer, rep, download, amount=1,
            unit="s", cpu_per=(1, "s"), setup=setup)
    try:
        if peer.kind != "qemu-img":
            clientbench._compare(client_src, "qcow2", out, "qcow2")
    except RuntimeError as e:
        discard(benchmark, f"{peer.label}: {e}")
    finally:
        if os.path.exists(out):
            os.unlink(out)
