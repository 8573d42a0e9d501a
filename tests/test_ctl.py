"""ovirt-imageioctl as a subprocess against a real daemon."""

import json
import subprocess
import sys

import pytest

from conftest import new_ticket


def ctl(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "imageio.admin.ctl"] + list(args),
        input=stdin, capture_output=True, text=True, timeout=60)


def test_ticket_life(daemon, tmp_path):
    t = new_ticket("file:///var/tmp/imageio-ctl-test", 4096)
    path = tmp_path / "ticket.json"
    path.write_text(json.dumps(t))
    conf = daemon.confdir

    r = ctl("-c", conf, "add-ticket", str(path))
    assert r.returncode == 0, r.stderr

    # -c after the subcommand works too.
    r = ctl("show-ticket", "-c", conf, t["uuid"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["size"] == 4096

    r = ctl("-c", conf, "list-tickets")
    assert t["uuid"] in r.stdout.split()

    r = ctl("-c", conf, "mod-ticket", t["uuid"], "--timeout", "1000")
    assert r.returncode == 0, r.stderr
    assert json.loads(ctl("-c", conf, "show-ticket", t["uuid"]).stdout)[
        "timeout"] == 1000

    r = ctl("--conf-dir", conf, "del-ticket", t["uuid"])
    assert r.returncode == 0, r.stderr
    r = ctl("-c", conf, "show-ticket", t["uuid"])
    assert r.returncode == 1
    assert "No such ticket" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_add_from_stdin(daemon):
    t = new_ticket("file:///var/tmp/x", 1)
    r = ctl("-c", daemon.confdir, "add-ticket", "-", stdin=json.dumps(t))
    assert r.returncode == 0, r.stderr
    with daemon.client() as c:
        assert c.get_ticket(t["uuid"])["uuid"] == t["uuid"]
        c.del_ticket(t["uuid"])


@pytest.mark.parametrize("content,word", [
    ("{bad json", "Invalid ticket file"),
    ('{"uuid": "x", "size": -1, "url": "file:///x", "timeout": 1, '
     '"ops": ["read"]}', "'size'"),
])
def test_bad_ticket_file(daemon, tmp_path, content, word):
    path = tmp_path / "bad.json"
    path.write_text(content)
    r = ctl("-c", daemon.confdir, "add-ticket", str(path))
    assert r.returncode == 1
    assert word in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_missing_ticket_file(daemon, tmp_path):
    r = ctl("-c", daemon.confdir, "add-ticket", str(tmp_path / "nosuch"))
    assert r.returncode == 1
    assert "Cannot read ticket file" in r.stderr


def test_daemon_not_running(tmp_path):
    from harness.daemonproc import write_conf
    write_conf(str(tmp_path))
    r = ctl("-c", str(tmp_path), "list-tickets")
    assert r.returncode == 1
    assert "Cannot reach the imageio control service" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_timeout(daemon):
    r = ctl("-c", daemon.confdir, "mod-ticket", "x", "--timeout", "-5")
    assert r.returncode == 1


def test_admin_library(daemon):
    from imageio import admin
    cfg = admin.load_config(daemon.confdir)
    t = new_ticket("file:///var/tmp/x", 1)
    with admin.Client(cfg) as c:
        c.add_ticket(t)
        assert c.get_ticket(t["uuid"])["url"] == t["url"]
        c.mod_ticket(t["uuid"], {"timeout": 5})
        with pytest.raises(admin.ServerError) as e:
            c.mod_ticket(t["uuid"], {"timeout": "x"})
        assert e.value.status == 400
        c.del_ticket(t["uuid"])
        with pytest.raises(admin.NotFound):
            c.get_ticket(t["uuid"])
