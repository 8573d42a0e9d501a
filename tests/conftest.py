import socket
import ssl
import time
import uuid

import pytest

from harness.daemonproc import Daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """One real daemon process per test module."""
    d = Daemon(tmp_path_factory.mktemp("daemon")).start()
    yield d
    d.stop()


@pytest.fixture
def make_daemon(tmp_path):
    """Start daemons with extra configuration; stopped at the end."""
    started = []

    def make(extra="", env=None, name="d"):
        d = Daemon(tmp_path / "{}{}".format(name, len(started)), extra, env)
        started.append(d)
        return d.start()

    yield make
    for d in started:
        d.stop()


def new_ticket(url, size, ops=("read", "write"), timeout=300, **kw):
    t = {"uuid": str(uuid.uuid4()), "size": size, "url": url,
         "timeout": timeout, "ops": list(ops)}
    t.update(kw)
    return t


def request(con, method, url, body=None, headers=None):
    """One request on an http.client connection: (response, body)."""
    con.request(method, url, body=body, headers=headers or {})
    resp = con.getresponse()
    return resp, resp.read()


def make_image(path, size, data=b""):
    """A raw image of ``size`` bytes starting with ``data``, the rest a
    hole."""
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(size)
    return path


def add(daemon, path, size, **kw):
    """Add a file:// ticket for ``path`` to ``daemon``; return it."""
    t = new_ticket("file://" + str(path), size, **kw)
    daemon.add_ticket(t)
    return t


@pytest.fixture(params=["remote", "local"])
def service(request):
    """Each test runs on the remote (HTTPS) and the local (unix) service."""
    return request.param


def connect(daemon, service, timeout=60):
    """An http.client connection to the daemon's ``service``."""
    return daemon.https(timeout) if service == "remote" \
        else daemon.unix(timeout)


def connect_raw(daemon, service, timeout=60):
    """A plain socket to ``service`` ("remote" is TLS-wrapped, "local",
    "control"), for requests http.client cannot send."""
    if service in ("local", "control"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(daemon.local_socket if service == "local"
                  else daemon.control_socket)
        return s
    ctx = ssl.create_default_context(cafile=daemon.ca_file)
    raw = socket.create_connection(("localhost", daemon.remote_port),
                                   timeout=timeout)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def ticket_info(daemon, ticket_id):
    with daemon.client() as c:
        return c.get_ticket(ticket_id)


def wait_idle(daemon, ticket_id, timeout=15):
    """Wait until the ticket has no running operation and no connection;
    return its info."""
    deadline = time.monotonic() + timeout
    while True:
        info = ticket_info(daemon, ticket_id)
        if not info["active"] and info["connections"] == 0:
            return info
        if time.monotonic() > deadline:
            raise AssertionError("ticket still busy: {}".format(info))
        time.sleep(0.05)
