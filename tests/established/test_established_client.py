"""The established service's client library (ovirt-imageio 2.5.1, in its
own virtualenv) against this daemon: it must upload and download as it
does against the established daemon."""

import os
import subprocess

import pytest

from conftest import new_ticket
from bench.peers import ESTABLISHED_CLIENT as SCRIPT
from harness import nbdserver

MiB = 1024**2


@pytest.fixture(scope="module")
def established_python():
    from bench import peers
    exe = peers.ensure_established()
    return os.path.join(os.path.dirname(exe), "python")


def run_client(python, *args):
    r = subprocess.run([python, "-c", SCRIPT] + list(args),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


qemu_img = nbdserver.qemu_img


@pytest.fixture
def source_qcow2(tmp_path):
    """A qcow2 with data, zeroes and unallocated areas."""
    path = str(tmp_path / "source.qcow2")
    qemu_img("create", "-f", "qcow2", path, "64M")
    subprocess.run(
        ["qemu-io", "-f", "qcow2",
         "-c", "write -P 0x55 0 1M",
         "-c", "write -P 0xaa 10M 3M",
         "-c", "write -z 20M 1M",
         "-c", "write -P 0x11 63M 1M", path],
        check=True, capture_output=True, timeout=60)
    return path


def test_upload_download_file_backend(daemon, established_python,
                                      source_qcow2, tmp_path):
    target = tmp_path / "target.raw"
    with open(target, "wb") as f:
        f.truncate(64 * MiB)
    t = new_ticket("file://" + str(target), 64 * MiB)
    daemon.add_ticket(t)
    url = "https://localhost:{}/images/{}".format(daemon.remote_port,
                                                   t["uuid"])
    run_client(established_python, "upload", url, source_qcow2,
               daemon.ca_file)
    qemu_img("compare", "-f", "qcow2", "-F", "raw", source_qcow2,
             str(target))

    download = str(tmp_path / "download.qcow2")
    run_client(established_python, "download", url, download,
               daemon.ca_file, "qcow2")
    qemu_img("compare", source_qcow2, download)
