"""The proxy across a network: the storage daemon and the proxy daemon in
two network namespaces (the project's own test hosts) joined by a veth
pair, with link-local addresses that exist only inside them.  The test
reaches both daemons through their unix sockets, which cross namespaces.
"""

import json
import os
import subprocess
import uuid

import pytest

from conftest import new_ticket, request
from harness.daemonproc import Daemon
from imageio import tls

MiB = 1024**2
STORAGE_ADDR = "169.254.77.1"
PROXY_ADDR = "169.254.77.2"


def ip(*args):
    subprocess.run(["ip"] + list(args), check=True, capture_output=True,
                   timeout=30)


@pytest.fixture(scope="module")
def hosts():
    tag = uuid.uuid4().hex[:6]
    a, b = "imageio-{}-storage".format(tag), "imageio-{}-proxy".format(tag)
    ip("netns", "add", a)
    try:
        ip("netns", "add", b)
        ip("link", "add", "veth" + tag + "a", "type", "veth", "peer", "name",
           "veth" + tag + "b")
        ip("link", "set", "veth" + tag + "a", "netns", a)
        ip("link", "set", "veth" + tag + "b", "netns", b)
        for ns, dev, addr in ((a, "veth" + tag + "a", STORAGE_ADDR),
                              (b, "veth" + tag + "b", PROXY_ADDR)):
            ip("-n", ns, "addr", "add", addr + "/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield a, b
    finally:
        # Deleting a namespace removes its end of the veth pair, and the
        # pair with it.
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True,
                           timeout=30)


@pytest.fixture(scope="module")
def daemons(hosts, tmp_path_factory):
    ns_a, ns_b = hosts
    sdir = tmp_path_factory.mktemp("storage-host")
    # A certificate for the storage host's address on the veth link.
    tls.create_dev_pki(str(sdir / "pki/key.pem"), str(sdir / "pki/cert.pem"),
                       str(sdir / "pki/ca.pem"), hosts=("storage",),
                       addresses=(STORAGE_ADDR,))
    storage = Daemon(sdir, "[remote]\nhost = {}\nport = 54322\n".format(
        STORAGE_ADDR), prefix=["ip", "netns", "exec", ns_a])
    storage.start()
    proxy = Daemon(
        tmp_path_factory.mktemp("proxy-host"),
        "[remote]\nhost = {}\nport = 54322\n"
        "[backend_http]\nca_file = {}\n".format(PROXY_ADDR, storage.ca_file),
        prefix=["ip", "netns", "exec", ns_b])
    proxy.start()
    yield storage, proxy
    proxy.stop()
    storage.stop()


def test_storage_host_only_reachable_through_its_network(hosts, daemons):
    import socket
    # From this (the root) namespace the storage address does not route;
    # only the proxy host, on the veth link, reaches it.
    with pytest.raises(OSError):
        socket.create_connection((STORAGE_ADDR, 54322), timeout=2).close()
    ns_a, ns_b = hosts
    r = subprocess.run(
        ["ip", "netns", "exec", ns_b, "curl", "-sS", "--cacert",
         daemons[0].ca_file, "https://{}:54322/info/".format(STORAGE_ADDR)],
        capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "version" in r.stdout


def test_transfer_across_hosts(daemons, tmp_path):
    storage, proxy = daemons
    data = os.urandom(12 * MiB + 5)
    path = tmp_path / "disk.raw"
    path.write_bytes(data)
    remote = new_ticket("file://" + str(path), len(data))
    storage.add_ticket(remote)
    t = new_ticket("https://{}:54322/images/{}".format(
        STORAGE_ADDR, remote["uuid"]), len(data))
    proxy.add_ticket(t)

    con = proxy.unix()
    resp, body = request(con, "GET", "/images/" + t["uuid"])
    assert resp.status == 200, body
    assert body == data

    payload = os.urandom(9 * MiB + 3)
    resp, body = request(con, "PUT", "/images/" + t["uuid"], body=payload,
                         headers={"Content-Range": "bytes 7-{}/*".format(
                             7 + len(payload) - 1)})
    assert resp.status == 200, body
    expected = data[:7] + payload + data[7 + len(payload):]
    assert path.read_bytes() == expected

    resp, body = request(con, "PATCH", "/images/" + t["uuid"],
                         body=json.dumps({"op": "zero", "offset": MiB,
                                          "size": MiB, "flush": True}))
    assert resp.status == 200, body
    expected = expected[:MiB] + bytes(MiB) + expected[2 * MiB:]
    assert path.read_bytes() == expected

    resp, body = request(con, "GET", "/images/{}/extents".format(t["uuid"]))
    assert resp.status == 200
    extents = json.loads(body)
    assert sum(e["length"] for e in extents) == len(data)

    resp, body = request(con, "GET", "/images/{}/checksum".format(t["uuid"]))
    assert resp.status == 200
    direct = storage.unix()
    _, expected_sum = request(direct, "GET", "/images/{}/checksum".format(
        remote["uuid"]))
    assert json.loads(body) == json.loads(expected_sum)
