"""HTTP clients nobody here wrote read images through the real daemon over
HTTPS, byte for byte: qemu's curl block driver, nbdkit's curl plugin with
nbdcopy, and aria2c with 4 connections.  Each asks HEAD for the size and
Accept-Ranges first, then reads ranges."""

import json
import os
import subprocess

import pytest

from harness import nbdserver
from conftest import add

MiB = 1024**2


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """16 MiB: random data, a hole, more data; a multiple of 512 bytes
    (qemu rounds a raw image's size up to 512)."""
    path = tmp_path_factory.mktemp("clients") / "disk.raw"
    data = os.urandom(5 * MiB + 4097) + bytes(7 * MiB) + os.urandom(
        4 * MiB - 4097)
    with open(path, "wb") as f:
        f.write(data[:5 * MiB + 4097])
        f.seek(12 * MiB)
        f.write(data[12 * MiB:])
    return path, data


def url_of(daemon, ticket):
    return "https://localhost:{}/images/{}".format(daemon.remote_port,
                                                   ticket["uuid"])


def run(argv, timeout=120):
    r = subprocess.run([str(a) for a in argv], capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, "{} failed: {}".format(argv[0], r.stderr)
    return r


def test_qemu_img_convert_curl_driver(daemon, image, tmp_path):
    # qemu's curl driver reads the system CA store only: sslverify off.
    path, data = image
    t = add(daemon, path, len(data), ops=["read"])
    spec = {"file.driver": "https", "file.url": url_of(daemon, t),
            "file.sslverify": False}
    out = tmp_path / "out.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
         "json:" + json.dumps(spec), out])
    assert out.read_bytes() == data


def test_qemu_img_info_readonly_size(daemon, image):
    path, data = image
    t = add(daemon, path, len(data), ops=["read"])
    spec = {"file.driver": "https", "file.url": url_of(daemon, t),
            "file.sslverify": False}
    info = json.loads(run(["qemu-img", "info", "--output=json",
                           "json:" + json.dumps(spec)]).stdout)
    assert info["virtual-size"] == len(data)


def test_nbdkit_curl_nbdcopy(daemon, image, tmp_path):
    path, data = image
    t = add(daemon, path, len(data), ops=["read"])
    out = tmp_path / "out.raw"
    with nbdserver.nbdkit(
            "curl", "url=" + url_of(daemon, t),
            "cainfo=" + daemon.ca_file, read_only=True,
            sock=tmp_path / "curl.sock").start() as s:
        run(["nbdcopy", "--connections=4", s.url(), out])
    assert out.read_bytes() == data


def test_aria2c_four_connections(daemon, image, tmp_path):
    path, data = image
    t = add(daemon, path, len(data), ops=["read"])
    r = run(["aria2c", "-x4", "-s4", "--min-split-size=1M",
             "--ca-certificate=" + daemon.ca_file, "--allow-overwrite=true",
             "--file-allocation=none", "--console-log-level=warn",
             "--summary-interval=0", "-d", tmp_path, "-o", "out.raw",
             url_of(daemon, t)])
    assert (tmp_path / "out.raw").read_bytes() == data, r.stdout
    # It did split: several connections bound to the ticket.
    assert daemon.log().count("bound to ticket {}".format(
        t["uuid"][:8])) >= 2


def test_v2v_pool_sizing_read_only_ticket_fails_at_once(daemon, image):
    # virt-v2v's rhv-upload plugin sizes its pool of connections as
    # min(max_readers, max_writers, 4) from OPTIONS and takes a connection
    # from it for every write: with max_writers 0 the pool is empty and the
    # first write waits forever.  The established service answers 1, so
    # the write is sent and refused with 403 at once.
    import http.client
    import queue
    import ssl
    path, data = image
    t = add(daemon, path, len(data), ops=["read"])
    ctx = ssl.create_default_context(cafile=daemon.ca_file)

    def connect():
        return http.client.HTTPSConnection("localhost", daemon.remote_port,
                                           context=ctx, timeout=10)

    target = "/images/" + t["uuid"]
    con = connect()
    con.request("OPTIONS", target)
    options = json.loads(con.getresponse().read())
    con.close()
    count = min(options["max_readers"], options["max_writers"], 4)
    pool = queue.Queue(count)
    for _ in range(count):
        pool.put(connect())
    # The plugin blocks in pool.get(); a test waits a little only.
    con = pool.get(timeout=5)
    try:
        con.request("PUT", target, body=b"x" * 4096,
                    headers={"Content-Range": "bytes 0-4095/*"})
        resp = con.getresponse()
        body = resp.read()
    finally:
        con.close()
    assert resp.status == 403, body
    assert path.read_bytes()[:4096] == data[:4096]
