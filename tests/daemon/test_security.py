"""Security properties of the real daemon: the control socket's mode and
group, the TLS protocol floor (checked with ``openssl s_client``), no image
without a valid ticket on any service, ticket ids kept out of the log, and
privileges dropped before serving when started as root.
"""

import grp
import http.client
import json
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile

import pytest

from conftest import new_ticket, request, make_image, add

KiB = 1024
MiB = 1024**2


def connect(daemon, service, timeout=20):
    if service == "remote":
        return daemon.https(timeout)
    if service == "local":
        return daemon.unix(timeout)
    return daemon.control(timeout)


def proc_status(pid):
    fields = {}
    with open("/proc/{}/status".format(pid)) as f:
        for line in f:
            name, _, value = line.partition(":")
            fields[name] = value.split()
    return fields


# The control socket.

def test_control_socket_mode_and_group(daemon):
    st = os.stat(daemon.control_socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    # Not dropping privileges: the daemon's own user and group.
    status = proc_status(daemon.proc.pid)
    assert st.st_gid == int(status["Gid"][0])
    assert st.st_uid == int(status["Uid"][0])


def _connect_as(path, uid, gid, groups):
    """Exit status of a child connecting to unix socket ``path`` as
    uid/gid/groups: 0 connected, 13 permission denied."""
    code = ("import socket,sys\n"
            "s=socket.socket(socket.AF_UNIX)\n"
            "try:\n"
            "    s.connect(sys.argv[1])\n"
            "except PermissionError:\n"
            "    sys.exit(13)\n")

    def become():
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)

    # (The test's interpreter lives under /root: use the system one.)
    return subprocess.run(["/usr/bin/python3", "-I", "-c", code, path],
                          preexec_fn=become, timeout=20).returncode


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_control_socket_only_for_the_group(make_daemon, public_dir):
    # Another user may not connect; the same user in the socket's group
    # may.  (The socket lives in a directory everyone can search, so only
    # the socket's own mode decides.)
    d = make_daemon("[control]\nsocket = {}/control.sock\n".format(
        public_dir))
    nobody = pwd.getpwnam("nobody")
    path = d.control_socket
    assert os.path.dirname(path) == public_dir
    gid = os.stat(path).st_gid
    assert _connect_as(path, nobody.pw_uid, nobody.pw_gid, []) == 13
    assert _connect_as(path, nobody.pw_uid, nobody.pw_gid, [gid]) == 0


# TLS.

def s_client(daemon, *args):
    host = daemon.addresses["remote"].split("//", 1)[1]
    p = subprocess.run(
        ["openssl", "s_client", "-connect", host, "-CAfile", daemon.ca_file,
         "-servername", "localhost"] + list(args),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=30)
    m = re.search(r"^New, (\S+), Cipher is (\S+)", p.stdout, re.M)
    established = p.returncode == 0 and m and m.group(2) != "(NONE)"
    return bool(established), p.stdout


# OpenSSL 3 clients refuse TLS 1.0/1.1 at the default security level
# before the server has a say; level 0 lets the server decide.
LEGACY = ["-cipher", "DEFAULT:@SECLEVEL=0"]


def test_tls_minimum_1_2(daemon):
    ok, out = s_client(daemon, "-tls1_1", *LEGACY)
    assert not ok, out
    # Refused by the server: it answered with a protocol_version alert.
    assert "alert protocol version" in out, out
    ok, out = s_client(daemon, "-tls1", *LEGACY)
    assert not ok and "alert protocol version" in out, out
    ok, out = s_client(daemon, "-tls1_2")
    assert ok, out
    assert "Protocol  : TLSv1.2" in out
    ok, out = s_client(daemon, "-tls1_3")
    assert ok, out
    assert "TLSv1.3" in out
    # And the certificate verified against the daemon's CA.
    assert "Verify return code: 0 (ok)" in out


def test_tls_1_1_only_when_configured(make_daemon):
    d = make_daemon("[tls]\nenable_tls1_1 = true\n")
    # This host's OpenSSL (3.x) still speaks TLS 1.1 at security level 0,
    # so the server accepts it when configured...
    ok, out = s_client(d, "-tls1_1", *LEGACY)
    assert ok, out
    assert "Protocol  : TLSv1.1" in out
    # ...but never TLS 1.0, and 1.2/1.3 still work.
    ok, out = s_client(d, "-tls1", *LEGACY)
    assert not ok, out
    ok, out = s_client(d, "-tls1_2")
    assert ok, out
    ok, out = s_client(d, "-tls1_3")
    assert ok, out


def test_plain_http_on_tls_port(daemon):
    # A plain-HTTP request on the TLS port gets no image.
    with socket.create_connection(("localhost", daemon.remote_port),
                                  timeout=10) as s:
        s.sendall(b"GET /info/ HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            out = s.recv(4096)
        except OSError:
            out = b""
    assert b"HTTP/1.1 200" not in out


# No image without a valid ticket.

@pytest.fixture
def guarded(daemon, tmp_path):
    """A valid ticket and its image, plus ids that must not work."""
    data = os.urandom(256 * KiB)
    path = make_image(tmp_path / "secret.raw", len(data), data)
    t = add(daemon, path, len(data))
    deleted = add(daemon, path, len(data))
    expired = add(daemon, path, len(data))
    with daemon.client() as c:
        c.del_ticket(deleted["uuid"])
        c.mod_ticket(expired["uuid"], {"timeout": 0})
    uid = t["uuid"]
    bad_ids = {
        "unknown": "00000000-0000-4000-8000-000000000000",
        "deleted": deleted["uuid"],
        "expired": expired["uuid"],
        "prefix": uid[:8],
        "logged-prefix": uid[:8] + "...",
        "truncated": uid[:-1],
        "extended": uid + "0",
        "upper": uid.upper(),
        "spaces": "%20" + uid,
        "star": "*",
    }
    return t, path, data, bad_ids


REQUESTS = [
    ("GET", "", None),
    ("PUT", "", b"X" * 4096),
    ("PATCH", "", json.dumps({"op": "zero", "size": 4096}).encode()),
    ("PATCH", "", json.dumps({"op": "flush"}).encode()),
    ("OPTIONS", "", None),
    ("GET", "/extents", None),
    ("GET", "/extents?context=dirty", None),
    ("GET", "/checksum", None),
    ("GET", "/checksum/algorithms", None),
]


@pytest.mark.parametrize("service", ["remote", "local"])
def test_no_image_without_valid_ticket(daemon, guarded, service):
    t, path, data, bad_ids = guarded
    before = os.stat(path)
    for name, bad in bad_ids.items():
        for method, suffix, body in REQUESTS:
            if bad == "*" and method == "OPTIONS" and not suffix:
                continue  # OPTIONS * is the server's features: no image.
            con = connect(daemon, service)
            resp, answer = request(con, method,
                                   "/images/" + bad + suffix, body=body)
            con.close()
            where = (name, method, suffix, resp.status, answer[:100])
            assert resp.status in (403, 404), where
            assert data[:64] not in answer, where
            assert answer.strip(), where
            if resp.status == 403:
                assert resp.getheader("Connection") == "close", where
    after = os.stat(path)
    assert after.st_mtime_ns == before.st_mtime_ns
    with open(path, "rb") as f:
        assert f.read() == data
    # The valid ticket still works.
    con = connect(daemon, service)
    resp, answer = request(con, "GET", "/images/" + t["uuid"])
    assert resp.status == 200 and answer == data


def test_options_star_reveals_no_image(daemon, guarded):
    t, path, data, _ = guarded
    for service in ("remote", "local"):
        con = connect(daemon, service)
        resp, answer = request(con, "OPTIONS", "/images/*")
        assert resp.status == 200
        info = json.loads(answer)
        assert set(info) <= {"features", "unix_socket", "encodings"}
        con.close()


def test_readonly_ticket_cannot_write(daemon, tmp_path):
    data = os.urandom(64 * KiB)
    path = make_image(tmp_path / "ro.raw", len(data), data)
    t = add(daemon, path, len(data), ops=["read"])
    for service in ("remote", "local"):
        for method, suffix, body in REQUESTS[1:4]:
            con = connect(daemon, service)
            resp, answer = request(con, method, "/images/" + t["uuid"],
                                   body=body)
            assert resp.status == 403, (service, method, answer)
            con.close()
    with open(path, "rb") as f:
        assert f.read() == data


def test_control_service_serves_no_images(daemon, guarded):
    t, path, data, _ = guarded
    for method, suffix, body in REQUESTS + [("GET", "/../..", None)]:
        con = connect(daemon, "control")
        resp, answer = request(con, method, "/images/" + t["uuid"] + suffix,
                               body=body)
        con.close()
        assert resp.status in (400, 404, 405), (method, suffix, resp.status)
        assert data[:64] not in answer
    for target in ("/info/", "/", "/images/*"):
        con = connect(daemon, "control")
        resp, answer = request(con, "GET", target)
        con.close()
        assert resp.status in (404, 405), (target, resp.status)
    with open(path, "rb") as f:
        assert f.read() == data


@pytest.mark.parametrize("service", ["remote", "local"])
def test_images_services_serve_no_tickets(daemon, guarded, service, tmp_path):
    # The ticket API is reachable only through the control socket.
    t, path, data, _ = guarded
    forged = new_ticket("file://" + str(path), len(data))
    attempts = [
        ("GET", "/tickets/", None),
        ("GET", "/tickets/" + t["uuid"], None),
        ("PUT", "/tickets/" + forged["uuid"], json.dumps(forged).encode()),
        ("PATCH", "/tickets/" + t["uuid"],
         json.dumps({"timeout": 99999}).encode()),
        ("DELETE", "/tickets/" + t["uuid"], None),
        ("DELETE", "/tickets/", None),
    ]
    with daemon.client() as c:
        before = c.get_ticket(t["uuid"])
    for method, target, body in attempts:
        con = connect(daemon, service)
        resp, answer = request(con, method, target, body=body)
        con.close()
        assert resp.status in (404, 405), (method, target, resp.status)
        assert b"file://" not in answer
    with daemon.client() as c:
        after = c.get_ticket(t["uuid"])
        assert after["timeout"] == before["timeout"]
        assert not after["canceled"]
        with pytest.raises(Exception):
            c.get_ticket(forged["uuid"])


# Ticket ids in the log.

INFO_LOG = "[logger_root]\nlevel = INFO\nhandlers = stderr\n"


def _check_log(d, secrets):
    text = d.log()
    for secret in secrets:
        assert secret not in text, [line for line in text.splitlines()
                                    if secret in line]


def test_ticket_id_not_logged_full_cycle(make_daemon, tmp_path):
    d = make_daemon(INFO_LOG)
    data = os.urandom(MiB)
    path = make_image(tmp_path / "image.raw", len(data), data)
    t = new_ticket("file://" + str(path), len(data))
    ro = new_ticket("file://" + str(path), len(data), ops=["read"])
    with d.client() as c:
        c.add_ticket(t)
        c.add_ticket(ro)
        c.get_ticket(t["uuid"])
    for service in ("remote", "local"):
        con = connect(d, service)
        uid = t["uuid"]
        for method, url, body, headers in [
                ("OPTIONS", "/images/" + uid, None, {}),
                ("GET", "/images/" + uid, None, {}),
                ("GET", "/images/" + uid, None, {"Range": "bytes=0-99"}),
                ("PUT", "/images/" + uid, data, {}),
                ("PUT", "/images/{}?flush=n".format(uid), b"x" * 4096,
                 {"Content-Range": "bytes 4096-8191/*"}),
                ("PATCH", "/images/" + uid,
                 json.dumps({"op": "zero", "offset": 0, "size": 4096}),
                 {}),
                ("PATCH", "/images/" + uid, json.dumps({"op": "flush"}), {}),
                ("GET", "/images/{}/extents".format(uid), None, {}),
                ("GET", "/images/{}/checksum".format(uid), None, {}),
                ("GET", "/images/{}/checksum/algorithms".format(uid), None,
                 {}),
                ("GET", "/images/" + ro["uuid"], None, {})]:
            resp, answer = request(con, method, url, body=body,
                                   headers=headers)
            assert resp.status in (200, 206), (method, url, answer)
        con.close()
    with d.client() as c:
        c.mod_ticket(t["uuid"], {"timeout": 100})
        c.del_ticket(t["uuid"])
        c.del_ticket(ro["uuid"])
    # The command line tool too.
    ctl = new_ticket("file://" + str(path), len(data))
    ticket_file = tmp_path / "ticket.json"
    ticket_file.write_text(json.dumps(ctl))
    for args in (["add-ticket", str(ticket_file)],
                 ["show-ticket", ctl["uuid"]],
                 ["mod-ticket", ctl["uuid"], "--timeout", "50"],
                 ["del-ticket", ctl["uuid"]]):
        subprocess.run([os.path.join(os.path.dirname(
            os.path.abspath(sys.executable)), "ovirt-imageioctl"),
            "-c", d.confdir] + args, check=True, timeout=30,
            stdout=subprocess.DEVNULL)
    d.stop()
    _check_log(d, [t["uuid"], ro["uuid"], ctl["uuid"]])
    # The log did record the cycle, with short ids.
    assert "Added ticket {}".format(t["uuid"][:8]) in d.log()


def test_ticket_id_not_logged_on_errors(make_daemon, tmp_path):
    # Requests that fail still name the ticket in the log only by its
    # short id: wrong method, unknown sub-resource, bad range, bad body,
    # refused write, missing ticket.
    d = make_daemon(INFO_LOG)
    data = os.urandom(64 * KiB)
    path = make_image(tmp_path / "image.raw", len(data), data)
    t = add(d, path, len(data))
    ro = add(d, path, len(data), ops=["read"])
    uid = t["uuid"]
    failing = [
        ("HEAD", "/images/" + uid, None, {"Range": "bytes=99999999-"}),
        ("DELETE", "/images/" + uid, None, {}),
        ("POST", "/images/" + uid, b"x", {}),
        ("GET", "/images/{}/nosuch".format(uid), None, {}),
        ("GET", "/images/{}/extents/".format(uid), None, {}),
        ("GET", "/images/{}/extents?context=dirty".format(uid), None, {}),
        ("GET", "/images/{}/checksum?algorithm=nosuch".format(uid), None,
         {}),
        ("GET", "/images/" + uid, None, {"Range": "bytes=99999999-"}),
        ("PUT", "/images/" + uid, b"x" * 10,
         {"Content-Range": "bytes 99999999-100000008/*"}),
        ("PATCH", "/images/" + uid, b"{not json", {}),
        ("PUT", "/images/" + ro["uuid"], b"x", {}),
        ("GET", "/images/" + uid + "0", None, {}),
    ]
    for service in ("remote", "local"):
        for method, url, body, headers in failing:
            con = connect(d, service)
            try:
                resp, _ = request(con, method, url, body=body,
                                  headers=headers)
                assert resp.status >= 400, (method, url)
            except http.client.HTTPException:
                pass
            con.close()
    with d.client() as c:
        c.del_ticket(uid)
        for bad in (uid, ro["uuid"] + "x"):
            with pytest.raises(Exception):
                c.get_ticket(bad)
        with pytest.raises(Exception):
            c.mod_ticket(uid, {"timeout": 5})
    con = connect(d, "control")
    resp, _ = request(con, "PUT", "/tickets/" + uid, body=b"{bad")
    resp, _ = request(d.control(), "POST", "/tickets/" + uid, body=b"{}")
    d.stop()
    _check_log(d, [uid, ro["uuid"]])


# Privileges.

@pytest.fixture
def public_dir():
    """A directory the nobody user can reach (tmp_path's parents are
    0700)."""
    path = tempfile.mkdtemp(prefix="imageio-sec-", dir="/var/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_privileges_dropped_before_serving(make_daemon, tmp_path, public_dir):
    d = make_daemon("[daemon]\ndrop_privileges = true\nuser_name = nobody\n"
                    "group_name = nogroup\n")
    nobody = pwd.getpwnam("nobody")
    nogroup = grp.getgrnam("nogroup")
    # Before any request: every thread of the daemon runs as nobody, with
    # no supplementary groups and no capabilities.
    pid = d.proc.pid
    for tid in os.listdir("/proc/{}/task".format(pid)):
        status = proc_status("{}/task/{}".format(pid, tid))
        assert status["Uid"] == [str(nobody.pw_uid)] * 4, status["Uid"]
        assert status["Gid"] == [str(nogroup.gr_gid)] * 4, status["Gid"]
        assert status.get("Groups", []) in ([], [str(nogroup.gr_gid)])
        assert int(status["CapEff"][0], 16) == 0
        assert int(status["CapPrm"][0], 16) == 0
    # It dropped them before it started accepting.
    log = d.log()
    assert log.index("Dropped privileges to nobody:nogroup") < \
        log.index("Listening remote service")
    # The control socket belongs to the daemon's group, 0660.
    st = os.stat(d.control_socket)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == nogroup.gr_gid
    # The images service works, on files nobody may use...
    data = os.urandom(MiB)
    path = make_image(os.path.join(public_dir, "image.raw"), len(data))
    os.chmod(path, 0o666)
    t = add(d, path, len(data))
    for service in ("remote", "local"):
        con = connect(d, service)
        resp, answer = request(con, "PUT", "/images/" + t["uuid"], body=data)
        assert resp.status == 200, answer
        resp, answer = request(con, "GET", "/images/" + t["uuid"])
        assert resp.status == 200 and answer == data
        con.close()
    # ...and not on files only root may use.
    secret = make_image(tmp_path / "root-only.raw", MiB, b"secret")
    os.chmod(secret, 0o600)
    t = add(d, secret, MiB)
    con = connect(d, "local")
    resp, answer = request(con, "GET", "/images/" + t["uuid"],
                           headers={"Range": "bytes=0-5"})
    assert resp.status >= 400 and b"secret" not in answer, answer
    assert answer.strip()


def test_no_drop_when_not_configured(daemon):
    # The module daemon (drop_privileges = false) keeps the test's user:
    # the option, not the uid, decides.
    status = proc_status(daemon.proc.pid)
    assert status["Uid"][0] == str(os.geteuid())
