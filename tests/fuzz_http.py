"""atheris fuzz target: the HTTP request parser, from raw bytes to a
handled request, through a real Connection over a socket pair.

Run: python tests/fuzz_http.py -max_total_time=60
Any exception other than the ones the connection handles is a crash.
"""

import logging
import socket
import sys
import threading

import atheris

with atheris.instrument_imports():
    from imageio import errors
    from imageio import http
    from imageio import httpparse


class Echo:
    """A handler that reads what the request claims to have."""

    def get(self, req, resp, *args):
        resp.send(200, b"ok")

    def put(self, req, resp, *args):
        body = req.body()
        buf = bytearray(65536)
        view = memoryview(buf)
        if req.chunked:
            while body.next_chunk():
                while body.readinto(view):
                    pass
        else:
            while body.readinto(view):
                pass
        resp.send(200, b"ok")

    def patch(self, req, resp, *args):
        req.read_json()
        resp.send(200)


FAILURES = []


class _Record(logging.Handler):
    """Errors the connection logged as unexpected (500 with traceback)."""

    def emit(self, record):
        if record.levelno >= logging.ERROR:
            FAILURES.append(self.format(record))


logging.getLogger().addHandler(_Record())
logging.getLogger().setLevel(logging.WARNING)
threading.excepthook = lambda args: FAILURES.append(repr(args.exc_value))

ROUTER = http.Router([(r"/images/([^/]+)", Echo()), (r"/x", Echo())])


def one_input(data):
    # The pure parsers on their own.
    for line in data.split(b"\n")[:4]:
        for func in (httpparse.parse_request_line,
                     httpparse.parse_header_line,
                     httpparse.parse_chunk_size):
            try:
                func(line)
            except errors.BadRequest:
                pass
    text = data[:80].decode("latin-1")
    for func in (lambda v: httpparse.parse_range(v, 10**9),
                 httpparse.parse_content_range,
                 httpparse.parse_content_length):
        try:
            func(text)
        except (errors.BadRequest, errors.RangeNotSatisfiable):
            pass

    # A whole connection.
    a, b = socket.socketpair()
    conn = http.Connection(a, ROUTER, timeout=2, name="fuzz")
    t = threading.Thread(target=conn.serve)
    t.start()
    try:
        b.sendall(data)
    except OSError:
        pass
    b.shutdown(socket.SHUT_WR)
    b.settimeout(5)
    try:
        while b.recv(65536):
            pass
    except OSError:
        pass
    t.join(10)
    b.close()
    if t.is_alive():
        raise RuntimeError("connection thread hung")
    if FAILURES:
        raise RuntimeError("unexpected error: {}".format(FAILURES[0]))


def main():
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
