"""The clients of the end-to-end benchmarks: curl for bulk transfers (what
scripts and people use, and a client that is not the bottleneck), and
Python's http.client for uploads from Python and many small requests on one
keep-alive connection (what the SDK does)."""

import http.client
import json
import ssl
import subprocess

from .peers import UnixHTTPConnection

CURL = "curl"


class ClientError(Exception):
    pass


def _curl_target(server, path, transport, cacert):
    if transport == "unix":
        return ["--unix-socket", server.unix_socket, "http://localhost" + path]
    host, port = server.https
    return ["--cacert", cacert, f"https://{host}:{port}{path}"]


def curl_get(server, path, transport, cacert=None, byte_range=None):
    """GET path with curl into /dev/null; return the bytes received."""
    cmd = [CURL, "-sS", "-o", "/dev/null",
           "-w", "%{http_code} %{size_download}"]
    if byte_range is not None:
        cmd += ["-r", "%d-%d" % byte_range]
    cmd += _curl_target(server, path, transport, cacert)
    return _check(subprocess.run(cmd, capture_output=True, text=True),
                  (200, 206))


def curl_get_parallel(server, path, transport, cacert, size, connections):
    """GET the whole image as `connections` concurrent ranged requests."""
    step = (size + connections - 1) // connections
    procs = []
    for i in range(connections):
        first = i * step
        last = min(size, first + step) - 1
        cmd = [CURL, "-sS", "-o", "/dev/null",
               "-w", "%{http_code} %{size_download}", "-r",
               f"{first}-{last}"]
        cmd += _curl_target(server, path, transport, cacert)
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    total = 0
    for p in procs:
        out, err = p.communicate()
        total += _check(subprocess.CompletedProcess(p.args, p.returncode,
                                                    out, err), (206,))
    return total


def curl_put(server, path, transport, src, cacert=None):
    """PUT the file src with curl (Content-Length, no Expect: 100)."""
    cmd = [CURL, "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_upload}",
           "-H", "Expect:", "-T", src]
    cmd += _curl_target(server, path, transport, cacert)
    return _check(subprocess.run(cmd, capture_output=True, text=True),
                  (200,))


def _check(res, statuses):
    if res.returncode != 0:
        raise ClientError(f"{res.args[-1]}: curl exit {res.returncode}: "
                          f"{res.stderr.strip()}")
    code, nbytes = res.stdout.split()
    if int(code) not in statuses:
        raise ClientError(f"{res.args[-1]}: HTTP {code}")
    return int(float(nbytes))


def connect(server, transport, cacert=None, timeout=60):
    """An http.client connection to the server over 'unix' or 'https'."""
    if transport == "unix":
        return UnixHTTPConnection(server.unix_socket, timeout=timeout)
    ctx = ssl.create_default_context(cafile=cacert)
    host, port = server.https
    return http.client.HTTPSConnection(host, port, context=ctx,
                                       timeout=timeout,
                                       blocksize=1024 * 1024)


def ranged_gets(conn, path, offsets, length):
    """GET length bytes at each offset on one keep-alive connection."""
    total = 0
    for offset in offsets:
        last = offset + length - 1
        conn.request("GET", path, headers={"Range": f"bytes={offset}-{last}"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 206 or len(data) != length:
            raise ClientError(f"GET {path} at {offset}: {resp.status}, "
                              f"{len(data)} bytes")
        if resp.will_close:
            raise ClientError(f"GET {path}: server closed the connection")
        total += len(data)
    return total


def get_json(conn, path):
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    if resp.status != 200:
        raise ClientError(f"GET {path}: {resp.status} {body[:200]!r}")
    return json.loads(body)


def read_range(conn, path, offset, length):
    conn.request("GET", path,
                 headers={"Range": f"bytes={offset}-{offset + length - 1}"})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 206:
        raise ClientError(f"GET {path}: {resp.status} {data[:200]!r}")
    return data
