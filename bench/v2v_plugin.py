"""An nbdkit Python plugin that behaves as virt-v2v's output to oVirt does:
NBD writes turned into HTTPS requests to an imageio daemon, over a pool of
4 connections — a PUT per NBD write (up to 4 MiB), PATCH zero for
WRITE_ZEROES/TRIM, PATCH flush for FLUSH.  The peer of the daemon's own NBD
service in bench/nbdserve.py and the gate (bench/test_e2e_nbdserve.py).

    nbdkit -U SOCK python bench/v2v_plugin.py url=URL cafile=CA size=N

Written for the benchmark from the documented HTTP API (docs/, SPEC), not
from virt-v2v's code.
"""

import http.client
import json
import queue
import ssl
import urllib.parse

import nbdkit

API_VERSION = 2
POOL = 4

_cfg = {}
_pool = queue.Queue()


def config(key, value):
    _cfg[key] = value


def config_complete():
    for key in ("url", "cafile", "size"):
        if key not in _cfg:
            raise RuntimeError("missing {}=".format(key))


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def _connect():
    u = urllib.parse.urlsplit(_cfg["url"])
    ctx = ssl.create_default_context(cafile=_cfg["cafile"])
    return http.client.HTTPSConnection(u.hostname, u.port, context=ctx)


def get_ready():
    for _ in range(POOL):
        _pool.put(_connect())


def open(readonly):
    return {}


def get_size(h):
    return int(_cfg["size"])


def can_write(h):
    return True


def can_flush(h):
    return True


def can_zero(h):
    return True


def can_trim(h):
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_multi_conn(h):
    return True


def block_size(h):
    # What virt-v2v's plugin advertises: writes up to 4 MiB.
    return (1, 64 * 1024, 4 * 1024 * 1024)


def _request(method, body, headers):
    path = urllib.parse.urlsplit(_cfg["url"]).path
    con = _pool.get()
    try:
        if method == "PUT":
            path += "?flush=" + headers.pop("flush")
        con.request(method, path, body=body, headers=headers)
        r = con.getresponse()
        data = r.read()
        if r.status not in (200, 204):
            raise RuntimeError("{} failed: {} {}".format(method, r.status,
                                                        data[:200]))
    except BaseException:
        con.close()
        con = _connect()
        raise
    finally:
        _pool.put(con)


def pwrite(h, buf, offset, flags):
    end = offset + len(buf) - 1
    _request("PUT", buf, {
        "Content-Range": "bytes {}-{}/*".format(offset, end),
        "Content-Length": str(len(buf)),
        "flush": "y" if flags & nbdkit.FLAG_FUA else "n"})


def _patch(msg):
    body = json.dumps(msg).encode()
    _request("PATCH", body, {"Content-Type": "application/json",
                             "Content-Length": str(len(body))})


def zero(h, count, offset, flags):
    _patch({"op": "zero", "offset": offset, "size": count,
            "flush": bool(flags & nbdkit.FLAG_FUA)})


def trim(h, count, offset, flags):
    zero(h, count, offset, flags)


def flush(h, flags):
    _patch({"op": "flush"})


def pread(h, buf, offset, flags):
    path = urllib.parse.urlsplit(_cfg["url"]).path
    con = _pool.get()
    try:
        con.request("GET", path, headers={
            "Range": "bytes={}-{}".format(offset, offset + len(buf) - 1)})
        r = con.getresponse()
        buf[:] = r.read()
    finally:
        _pool.put(con)
