import uuid

import pytest

from daemonproc import Daemon


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
