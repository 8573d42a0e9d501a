"""Prometheus metrics: the daemon's registry and the few calls that feed it.

The names are SPEC.md section 9's.  Everything is counted per request or
per backend call, in Python, never per byte and never inside the C loops:
a request knows how many bytes it moved when it ends.  ``prometheus_client``
writes the exposition format (``exposition()``); nothing here formats it.

No label holds a ticket id (ids are secrets and would make one series per
transfer); HTTP methods outside ``METHODS`` are labelled ``other`` so that
garbage methods from the open port cannot multiply series.
"""

import bisect
import logging
import threading
import time

import prometheus_client
from prometheus_client import exposition as _exposition
from prometheus_client.core import (CounterMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.utils import floatToGoString

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
    ("GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS",
     # NBD commands (the nbd services), counted with the same names.
     "READ", "WRITE", "FLUSH", "TRIM", "CACHE", "WRITE_ZEROES",
     "BLOCK_STATUS"))
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

# Status counted for a request that ended without any response (the client
# went away or stalled): nginx's "client closed request".
NO_RESPONSE = 499

# Backend series exist from the start at 0 (urls.scheme_of names the
# kinds): a counter that appears only at its first error has no rate() for
# that error, and a dashboard panel over it would be empty.
BACKEND_KINDS = ("file", "nbd", "http")


class _Counts:
    """One thread's counts of the per-request metrics: plain ints in dicts
    only that thread writes.  prometheus_client's Counter takes a lock on
    every inc() and its Histogram two per observe(); counting here takes
    none, and the totals are summed when Prometheus scrapes."""

    __slots__ = ("requests", "durations", "backend")

    def __init__(self):
        # (service, method, status) -> requests
        self.requests = {}
        # (service, method) -> [count per bucket..., +Inf count, sum]
        self.durations = {}
        # (family, backend kind, op) -> count or bytes
        self.backend = {}

    def add(self, other):
        """Add ``other``'s counts (a snapshot, or a thread's that ended)."""
        for key, n in other.requests.items():
            self.requests[key] = self.requests.get(key, 0) + n
        for key, d in other.durations.items():
            mine = self.durations.get(key)
            if mine is None:
                self.durations[key] = list(d)
            else:
                for i, n in enumerate(d):
                    mine[i] += n
        for key, n in other.backend.items():
            self.backend[key] = self.backend.get(key, 0) + n

    def copy(self):
        # dict.copy() and list() run without releasing the GIL: a whole,
        # consistent view of each dict while its thread goes on counting.
        c = _Counts()
        c.requests = self.requests.copy()
        c.durations = {k: list(d) for k, d in self.durations.copy().items()}
        c.backend = self.backend.copy()
        return c


class _Tally:
    """Every thread's _Counts, summed at scrape time."""

    def __init__(self):
        self._local = threading.local()
        self._lock = threading.Lock()
        # (thread, counts) of threads that counted and may count again.
        self._live = []
        # What ended threads counted.
        self._ended = _Counts()

    def counts(self):
        """The calling thread's counts (registered on first use)."""
        counts = getattr(self._local, "counts", None)
        if counts is None:
            counts = self._local.counts = _Counts()
            with self._lock:
                # Workers come and go (an idle one exits): fold the ended
                # ones in now, so the list stays as long as the threads
                # alive even if nobody ever scrapes.
                self._fold_ended()
                self._live.append((threading.current_thread(), counts))
        return counts

    def _fold_ended(self):
        # Under the lock.  A thread that is no longer alive writes no more.
        live = []
        for thread, counts in self._live:
            if thread.is_alive():
                live.append((thread, counts))
            else:
                self._ended.add(counts)
        self._live = live

    def total(self):
        with self._lock:
            self._fold_ended()
            live = list(self._live)
            total = _Counts()
            total.add(self._ended)
        for _, counts in live:
            total.add(counts.copy())
        return total


_tally = _Tally()


class _Collector:
    """The per-request families, from the tally."""

    def describe(self):
        return self._families(_Counts())

    def collect(self):
        return self._families(_tally.total())

    def _families(self, t):
        requests = CounterMetricFamily(
            "imageio_http_requests", "HTTP requests answered.",
            labels=["service", "method", "code"])
        for (service, method, status), n in sorted(t.requests.items()):
            requests.add_metric([service, method, str(status)], n)
        duration = HistogramMetricFamily(
            "imageio_http_request_duration_seconds",
            "Time from a request's first line to the end of its response.",
            labels=["service", "method"])
        for (service, method), d in sorted(t.durations.items()):
            buckets, n = [], 0
            for le, count in zip(_LE, d):
                n += count
                buckets.append((le, n))
            duration.add_metric([service, method], buckets, d[-1])
        families = {name: CounterMetricFamily(name, doc,
                                              labels=["backend", "op"])
                    for name, doc in _BACKEND_FAMILIES}
        values = dict.fromkeys(
            ((name, kind, op) for name, _ in _BACKEND_FAMILIES
             for kind in BACKEND_KINDS for op in BACKEND_OPS), 0)
        values.update(t.backend)
        for (name, kind, op), n in sorted(values.items()):
            families[name].add_metric([kind, op], n)
        return [requests, duration, *families.values()]


_LE = [floatToGoString(b) for b in DURATION_BUCKETS] + ["+Inf"]
_BACKEND_FAMILIES = (
    ("imageio_backend_bytes", "Bytes moved by completed backend operations."),
    ("imageio_backend_ops", "Backend operations."),
    ("imageio_backend_errors", "Backend operations that failed."),
)
_BYTES, _OPS, _ERRORS = (name for name, _ in _BACKEND_FAMILIES)

REGISTRY.register(_Collector())


def _count_backend(family, kind, op, n=1):
    backend = _tally.counts().backend
    key = (family, kind, op)
    backend[key] = backend.get(key, 0) + n


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
    counts = _tally.counts()
    requests = counts.requests
    key = (service, method, status or NO_RESPONSE)
    requests[key] = requests.get(key, 0) + 1
    key = (service, method)
    d = counts.durations.get(key)
    if d is None:
        d = counts.durations[key] = [0] * len(_LE) + [0.0]
    # Bucket le=b holds the durations <= b: the first bound not below.
    d[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
    d[-1] += seconds


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
        # The summary's counters: an NBD connection's lanes count at once.
        self._lock = threading.Lock()

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
                _count_backend(_ERRORS, self._kind, "extents")
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
                _count_backend(_ERRORS, m._kind, self._op)
        elif self._nbytes:
            _count_backend(_BYTES, m._kind, self._op, self._nbytes)
        _count_backend(_OPS, m._kind, self._op)
        elapsed = m._clock() - self._start
        with m._lock:
            if exc_type is None:
                m._bytes += self._nbytes
            m._ops[self._op] += 1
            m._busy += elapsed
        return False
