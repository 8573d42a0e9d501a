"""Sockets for tests and benchmarks: free loopback ports, http.client over
a unix socket, and raw HTTP exchanges for what http.client cannot send."""

import http.client
import socket

from imageio.admin import UnixHTTPConnection  # noqa: F401 (the one)


def free_port():
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_response(sock, method="GET"):
    """(status, body) of the response on a raw ``sock``, or (None,
    exception) when the daemon cut the connection instead of answering."""
    resp = http.client.HTTPResponse(sock, method=method)
    try:
        resp.begin()
        return resp.status, resp.read()
    except (http.client.HTTPException, OSError) as e:
        return None, e
