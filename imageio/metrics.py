"""Prometheus metrics: the daemon's registry and the few calls that feed it.

The names are SPEC.md section 9's.  Everything is counted per request or
per backend call, in Python, never per byte and never inside the C loops:
a request knows how many bytes it moved when it ends.  ``prometheus_client``
writes the exposition format (``exposition()``); nothing here formats it.

No label holds a ticket id (ids are secrets and would make one series per
transfer); HTTP methods outside ``METHODS`` are labelled ``other`` so that
garbage methods from the open port cannot multiply series.
"""

import logging
import time

import prometheus_client
from prometheus_client import exposition as _exposition

from . import __version__
from . import errors

log = logging.getLogger("metrics")

# The *_created series (when each counter was made) double the scrape for
# nothing Prometheus uses.
prometheus_client.disable_created_metrics()

REGISTRY = prometheus_client.CollectorRegistry(auto_describe=True)
# process_cpu_seconds_total, process_resident_memory_bytes,
# process_open_fds, ... read from /proc at scrape time.
prometheus_client.ProcessCollector(registry=REGISTRY)

METHODS = frozenset(
    ("GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS"))
BACKEND_OPS = ("read", "write", "zero", "flush", "extents")
# Seconds; transfers of whole images take minutes, so the buckets go far
# beyond the client library defaults (10 s).
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)

BUILD_INFO = prometheus_client.Info(
    "imageio_build", "The running daemon's version.", registry=REGISTRY)
BUILD_INFO.info({"version": __version__})

TICKETS = prometheus_client.Gauge(
    "imageio_tickets", "Tickets the daemon holds.", registry=REGISTRY)

CONNECTIONS = prometheus_client.Gauge(
    "imageio_connections", "Open client connections.", ["service"],
    registry=REGISTRY)

HTTP_REQUESTS = prometheus_client.Counter(
    "imageio_http_requests_total", "HTTP requests answered.",
    ["service", "method", "code"], registry=REGISTRY)

HTTP_DURATION = prometheus_client.Histogram(
    "imageio_http_request_duration_seconds",
    "Time from a request's first line to the end of its response.",
    ["service", "method"], buckets=DURATION_BUCKETS, registry=REGISTRY)

BACKEND_BYTES = prometheus_client.Counter(
    "imageio_backend_bytes_total",
    "Bytes moved by completed backend operations.",
    ["backend", "op"], registry=REGISTRY)

BACKEND_OPS_TOTAL = prometheus_client.Counter(
    "imageio_backend_ops_total", "Backend operations.",
    ["backend", "op"], registry=REGISTRY)

BACKEND_ERRORS = prometheus_client.Counter(
    "imageio_backend_errors_total", "Backend operations that failed.",
    ["backend", "op"], registry=REGISTRY)

# Backend series exist from the start at 0 (backends.scheme_of names the
# kinds): a counter that appears only at its first error has no rate() for
# that error, and a dashboard panel over it would be empty.
BACKEND_KINDS = ("file", "nbd", "http")
for _kind in BACKEND_KINDS:
    for _op in BACKEND_OPS:
        for _metric in (BACKEND_BYTES, BACKEND_OPS_TOTAL, BACKEND_ERRORS):
            _metric.labels(_kind, _op)

# Status counted for a request that ended without any response (the client
# went away or stalled): nginx's "client closed request".
NO_RESPONSE = 499

# Children by label values: labels() takes a lock and builds a key on every
# call; a dict hit costs neither.  Races only create the same child twice.
_children = {}


def _child(metric, *values):
    key = (metric, values)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*values)
    return child


def exposition(accept=None):
    """Return (body bytes, content type) for a scrape: OpenMetrics when the
    ``Accept`` header asks for it, else the Prometheus text format."""
    encoder, content_type = _exposition.choose_encoder(accept or "")
    return encoder(REGISTRY), content_type


def request_done(service, method, status, seconds):
    """Count one answered request of ``service`` (``status`` 0 or None: no
    response was sent)."""
    if method not in METHODS:
        method = "other"
    _child(HTTP_REQUESTS, service, method, str(status or NO_RESPONSE)).inc()
    _child(HTTP_DURATION, service, method).observe(seconds)


def track_connections(service, count):
    """Report ``count()`` as the open connections of ``service``, read at
    scrape time."""
    CONNECTIONS.labels(service).set_function(count)


def track_tickets(store):
    TICKETS.set_function(store.count)


def _is_backend_failure(e):
    # A client that goes away or stalls mid-transfer, a short body or a
    # canceled ticket are not the backend's failures.
    if isinstance(e, errors.BackendError):
        return True
    if isinstance(e, (ConnectionError, TimeoutError, errors.Error)):
        return False
    return isinstance(e, OSError)


class Metered:
    """A backend that counts its operations: per (backend kind, op) in the
    registry, and per connection for the line logged when it closes.

    Wraps the backend a connection opened for a ticket; everything but the
    counted operations is the backend's own (``__getattr__``).  One call of
    a counted method, or one engine call (``operation``), is one
    operation, whatever its size: the chunks and C loops inside it are not
    touched.
    """

    def __init__(self, backend, kind, conn_name, ticket_name,
                 clock=time.monotonic):
        self._backend = backend
        self._kind = kind
        self._conn_name = conn_name
        self._ticket_name = ticket_name
        self._clock = clock
        self._opened = clock()
        self._ops = dict.fromkeys(BACKEND_OPS, 0)
        self._bytes = 0
        self._busy = 0.0
        self._closed = False

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def operation(self, op, nbytes):
        """A context manager counting one copy engine call (imageio.ops)
        as one ``op`` of ``nbytes``; it yields the backend to move the
        bytes with, so the chunks inside are not counted again."""
        return _Operation(self, op, nbytes)

    def _run(self, op, nbytes, func, *args):
        with _Operation(self, op, nbytes):
            return func(*args)

    def readinto(self, buf, offset, length):
        return self._run("read", length, self._backend.readinto, buf,
                         offset, length)

    def zero(self, offset, length, punch_hole):
        return self._run("zero", length, self._backend.zero, offset, length,
                         punch_hole)

    def flush(self):
        return self._run("flush", 0, self._backend.flush)

    def extents(self, offset=0, length=None, context="zero"):
        # Backends may stream extents: failures while iterating count too.
        result = self._run("extents", 0, self._backend.extents, offset,
                           length, context)
        return self._iterate(result)

    def _iterate(self, extents):
        try:
            yield from extents
        except BaseException as e:
            if _is_backend_failure(e):
                _child(BACKEND_ERRORS, self._kind, "extents").inc()
            raise

    def close(self):
        try:
            self._backend.close()
        finally:
            if not self._closed:
                self._closed = True
                self._log_summary()

    def _log_summary(self):
        open_for = self._clock() - self._opened
        busy = self._busy
        rate = self._bytes / busy if busy > 0 else 0.0
        log.info("%s: ticket %s done: ops %s, %d bytes in %.3f s "
                 "(%.1f MiB/s), connection open %.3f s",
                 self._conn_name, self._ticket_name,
                 " ".join("{}={}".format(op, n)
                          for op, n in self._ops.items()),
                 self._bytes, busy, rate / 1024**2, open_for)


class _Operation:
    """One counted operation of a Metered backend (see Metered.operation)."""

    __slots__ = ("_meter", "_op", "_nbytes", "_start")

    def __init__(self, meter, op, nbytes):
        self._meter = meter
        self._op = op
        self._nbytes = nbytes

    def __enter__(self):
        self._start = self._meter._clock()
        return self._meter._backend

    def __exit__(self, exc_type, exc, tb):
        m = self._meter
        if exc_type is not None:
            if _is_backend_failure(exc):
                _child(BACKEND_ERRORS, m._kind, self._op).inc()
        elif self._nbytes:
            _child(BACKEND_BYTES, m._kind, self._op).inc(self._nbytes)
            m._bytes += self._nbytes
        _child(BACKEND_OPS_TOTAL, m._kind, self._op).inc()
        m._ops[self._op] += 1
        m._busy += m._clock() - self._start
        return False
