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
