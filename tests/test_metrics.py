"""Metrics: /metrics on the control service and the [metrics] listener,
scraped by a real Prometheus server; the ticket's rate; the line logged when
a transfer connection ends."""

import concurrent.futures
import json
import os
import re
import socket
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from imageio import accounting
from imageio import metrics
from imageio import redact

from conftest import add, make_image, request, ticket_info, wait_idle
from harness.daemonproc import Daemon
from harness.promserver import Prometheus

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASHBOARD = os.path.join(TOP, "examples", "grafana", "imageio.json")
MiB = 1024**2

METRICS_CONF = """\
[metrics]
port = 0
"""

NAMES = {
    "imageio_build_info": "gauge",
    "imageio_tickets": "gauge",
    "imageio_connections": "gauge",
    "imageio_http_requests": "counter",
    "imageio_http_request_duration_seconds": "histogram",
    "imageio_backend_bytes": "counter",
    "imageio_backend_ops": "counter",
    "imageio_backend_errors": "counter",
    "process_resident_memory_bytes": "gauge",
    "process_cpu_seconds": "counter",
    "process_open_fds": "gauge",
}


# Helpers

def metrics_url(daemon):
    return daemon.addresses["metrics"] + "/metrics"


def scrape(daemon):
    """The text of the [metrics] listener's /metrics."""
    with urllib.request.urlopen(metrics_url(daemon), timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return r.read().decode("utf-8")


def samples(text):
    """{(name, frozenset(labels)): value} of a text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text, name, **labels):
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    total = 0.0
    want = set(labels.items())
    for (n, lbls), v in samples(text).items():
        if n == name and want <= lbls:
            total += v
    return total


def target(daemon):
    """The [metrics] listener as a Prometheus target (host:port)."""
    return daemon.addresses["metrics"].split("://", 1)[1]


@pytest.fixture(scope="module")
def mdaemon(tmp_path_factory):
    """One daemon with a metrics listener for the module: tests compare
    counters before and after their traffic (``Delta``)."""
    d = Daemon(tmp_path_factory.mktemp("mdaemon"), METRICS_CONF).start()
    yield d
    d.stop()


class Delta:
    """Counter changes on ``daemon`` since this object was made."""

    def __init__(self, daemon):
        self.daemon = daemon
        self.before = scrape(daemon)

    def __call__(self, name, **labels):
        return value(scrape(self.daemon), name, **labels) - \
            value(self.before, name, **labels)

    def wait(self, expected, name, timeout=10, **labels):
        """Wait until the change of ``name`` is ``expected``: a request is
        counted just after its response went out."""
        deadline = time.monotonic() + timeout
        while True:
            got = self(name, **labels)
            if got == expected or time.monotonic() > deadline:
                assert got == expected, (name, labels)
                return
            time.sleep(0.05)


@pytest.fixture
def image(tmp_path):
    data = os.urandom(8 * MiB)
    path = make_image(tmp_path / "image.raw", 64 * MiB, data)
    return path, data


def traffic(daemon, path, gets=3, get_size=MiB, puts=2, put_size=2 * MiB,
            forbidden=2):
    """Known traffic on the local service: ``gets`` ranged GETs (206),
    ``puts`` PUTs, ``forbidden`` requests for an unknown ticket (403).
    Return the ticket and the bytes read and written."""
    ticket = add(daemon, path, 64 * MiB)
    url = "/images/" + ticket["uuid"]
    con = daemon.unix()
    for i in range(gets):
        resp, body = request(con, "GET", url, headers={
            "Range": "bytes={}-{}".format(i * get_size,
                                          (i + 1) * get_size - 1)})
        assert resp.status == 206 and len(body) == get_size
    for i in range(puts):
        resp, _ = request(con, "PUT", url + "?flush=n", body=b"x" * put_size,
                          headers={"Content-Range": "bytes {}-{}/*".format(
                              32 * MiB + i * put_size,
                              32 * MiB + (i + 1) * put_size - 1)})
        assert resp.status == 200
    con.close()
    for _ in range(forbidden):
        con = daemon.unix()
        resp, _ = request(con, "GET", "/images/no-such-ticket")
        assert resp.status == 403
        con.close()
    wait_idle(daemon, ticket["uuid"])
    return ticket, gets * get_size, puts * put_size


# The exposition

def test_names_and_types(mdaemon):
    text = scrape(mdaemon)
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    for name, kind in NAMES.items():
        assert families.get(name) == kind, name
    assert value(text, "imageio_build_info",
                 version=metrics.__version__) == 1
    # Backend series exist at 0 before any transfer: rate() works on them.
    for op in metrics.BACKEND_OPS:
        key = ("imageio_backend_errors_total",
               frozenset({"backend": "file", "op": op}.items()))
        assert samples(text)[key] == 0


def test_control_service_serves_the_same(mdaemon, image):
    delta = Delta(mdaemon)
    traffic(mdaemon, image[0], gets=1, puts=1, forbidden=1)
    delta.wait(1, "imageio_http_requests_total", service="local", code="403")
    con = mdaemon.control()
    resp, body = request(con, "GET", "/metrics")
    assert resp.status == 200
    assert resp.getheader("Content-Type").startswith("text/plain")
    text = body.decode("utf-8")
    assert value(text, "imageio_http_requests_total", service="local",
                 code="403") == value(scrape(mdaemon),
                                      "imageio_http_requests_total",
                                      service="local", code="403")
    assert value(text, "imageio_http_requests_total", service="control",
                 method="GET", code="200") >= 0


def test_openmetrics_when_asked(mdaemon):
    req = urllib.request.Request(metrics_url(mdaemon), headers={
        "Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.headers["Content-Type"].startswith(
            "application/openmetrics-text")
        assert r.read().rstrip().endswith(b"# EOF")


def test_default_host_is_localhost(mdaemon):
    host = target(mdaemon).rsplit(":", 1)[0].strip("[]")
    assert host in ("127.0.0.1", "::1")


def test_no_listener_by_default(daemon):
    assert "metrics" not in daemon.addresses
    # The control service has /metrics anyway.
    resp, body = request(daemon.control(), "GET", "/metrics")
    assert resp.status == 200 and b"imageio_tickets" in body


def test_known_traffic_counted(mdaemon, image):
    delta = Delta(mdaemon)
    ticket, read, written = traffic(mdaemon, image[0])
    delta.wait(2, "imageio_http_requests_total", service="local",
               code="403")
    assert delta("imageio_backend_bytes_total", backend="file",
                 op="read") == read
    assert delta("imageio_backend_bytes_total", backend="file",
                 op="write") == written
    assert delta("imageio_backend_ops_total", op="read") == 3
    assert delta("imageio_backend_ops_total", op="write") == 2
    assert delta("imageio_http_requests_total", service="local",
                 method="GET", code="206") == 3
    assert delta("imageio_http_requests_total", service="local",
                 method="PUT", code="200") == 2
    assert delta("imageio_http_request_duration_seconds_count",
                 service="local") == 7
    assert delta("imageio_tickets") == 1
    assert delta("imageio_backend_errors_total") == 0
    with mdaemon.client() as c:
        c.del_ticket(ticket["uuid"])
    assert delta("imageio_tickets") == 0


def test_no_ticket_id_in_metrics(mdaemon, image):
    delta = Delta(mdaemon)
    ticket, _, _ = traffic(mdaemon, image[0])
    ticket2 = add(mdaemon, image[0], 64 * MiB, transfer_id="xfer-1")
    con = mdaemon.https()
    resp, _ = request(con, "GET", "/images/" + ticket2["uuid"],
                      headers={"Range": "bytes=0-4095"})
    assert resp.status == 206
    con.close()
    delta.wait(1, "imageio_http_requests_total", service="remote",
               code="206")
    text = scrape(mdaemon)
    for t in (ticket, ticket2):
        # Not even the shortened id that logs show.
        assert t["uuid"][:8] not in text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert "ticket" not in s.labels


def test_garbage_methods_are_other(mdaemon, image):
    delta = Delta(mdaemon)
    ticket = add(mdaemon, image[0], 64 * MiB)
    for i in range(20):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(mdaemon.local_socket)
        s.sendall("BREW{} /images/{} HTTP/1.1\r\nHost: x\r\n\r\n".format(
            i, ticket["uuid"]).encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 ")
        s.close()
    delta.wait(20, "imageio_http_requests_total", service="local",
               method="other")
    text = scrape(mdaemon)
    methods = {dict(labels)["method"]
               for (name, labels) in samples(text)
               if name == "imageio_http_requests_total"}
    assert methods <= metrics.METHODS | {"other"}
    assert "BREW" not in text


def test_connections_gauge(mdaemon):
    before = value(scrape(mdaemon), "imageio_connections", service="local")
    socks = []
    for _ in range(3):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(mdaemon.local_socket)
        socks.append(s)
    deadline = time.monotonic() + 10
    while value(scrape(mdaemon), "imageio_connections",
                service="local") != before + 3:
        assert time.monotonic() < deadline, "connections not counted"
        time.sleep(0.05)
    for s in socks:
        s.close()
    while value(scrape(mdaemon), "imageio_connections",
                service="local") != before:
        assert time.monotonic() < deadline, "closed connections counted"
        time.sleep(0.05)


def test_backend_errors_counted(mdaemon, tmp_path):
    d = mdaemon
    delta = Delta(d)
    path = make_image(tmp_path / "gone.raw", MiB)
    ticket = add(d, path, 2 * MiB)  # Larger than the file.
    con = d.unix()
    resp, _ = request(con, "GET", "/images/" + ticket["uuid"],
                      headers={"Range": "bytes={}-{}".format(
                          MiB, MiB + 4095)})
    con.close()
    assert resp.status == 500
    delta.wait(1, "imageio_backend_errors_total", backend="file", op="read")
    assert delta("imageio_backend_bytes_total", op="read") == 0


def test_concurrent_transfers_consistent(mdaemon, image):
    path, data = image
    delta = Delta(mdaemon)
    ticket = add(mdaemon, path, 64 * MiB)
    url = "/images/" + ticket["uuid"]
    workers, rounds, size = 4, 6, 4 * MiB

    def work(i):
        con = mdaemon.unix()
        read = written = 0
        for r in range(rounds):
            offset = ((i * rounds + r) % 16) * size
            if (i + r) % 2:
                resp, body = request(con, "GET", url, headers={
                    "Range": "bytes={}-{}".format(offset, offset + size - 1)})
                assert resp.status == 206
                read += len(body)
            else:
                resp, _ = request(con, "PUT", url + "?flush=n",
                                  body=os.urandom(size), headers={
                                      "Content-Range": "bytes {}-{}/*".format(
                                          offset, offset + size - 1)})
                assert resp.status == 200
                written += size
        con.close()
        return read, written

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(work, range(workers)))
    wait_idle(mdaemon, ticket["uuid"])
    delta.wait(workers * rounds, "imageio_http_requests_total",
               service="local")
    assert delta("imageio_backend_bytes_total", op="read") == \
        sum(r for r, _ in results)
    assert delta("imageio_backend_bytes_total", op="write") == \
        sum(w for _, w in results)
    assert delta("imageio_backend_ops_total", op="read") + \
        delta("imageio_backend_ops_total", op="write") == workers * rounds


# The ticket's rate and the end-of-connection line

def test_rate_while_transferring_and_after(mdaemon, tmp_path):
    path = make_image(tmp_path / "big.raw", 512 * MiB, os.urandom(MiB))
    ticket = add(mdaemon, path, 512 * MiB)
    con = mdaemon.unix()
    con.request("GET", "/images/" + ticket["uuid"])
    resp = con.getresponse()
    assert resp.status == 200
    # Read at about 40 MiB/s for 2 seconds.
    start = time.monotonic()
    got = 0
    while time.monotonic() - start < 2.0:
        got += len(resp.read(4 * MiB))
        time.sleep(0.1)
    info = ticket_info(mdaemon, ticket["uuid"])
    elapsed = time.monotonic() - start
    assert info["active"]
    client_rate = got / elapsed
    # The daemon is ahead of the client by socket buffers and one chunk.
    assert 0.5 * client_rate < info["rate"] < 2.5 * client_rate, \
        (info["rate"], client_rate)
    con.close()
    wait_idle(mdaemon, ticket["uuid"])
    time.sleep(accounting.RATE_WINDOW + 1)
    assert ticket_info(mdaemon, ticket["uuid"])["rate"] == 0


def test_connection_summary_logged(mdaemon, image):
    ticket, read, written = traffic(mdaemon, image[0], gets=3, puts=2,
                                    forbidden=0)
    short = re.escape(redact.short_id(ticket["uuid"]))
    pattern = re.compile(r"ticket ({}) done: ops (.*)".format(short))
    # Logged when the daemon has closed the connection's backend.
    deadline = time.monotonic() + 10
    while not pattern.search(mdaemon.log()):
        assert time.monotonic() < deadline, mdaemon.log()[-3000:]
        time.sleep(0.05)
    line = pattern.search(mdaemon.log())
    assert line.group(1) == redact.short_id(ticket["uuid"])
    assert "read=3 write=2 zero=0 flush=0 extents=0" in line.group(2)
    assert "{} bytes in ".format(read + written) in line.group(2)
    assert re.search(r"\(\d+\.\d MiB/s\), connection open \d+\.\d+ s",
                     line.group(2))
    assert ticket["uuid"] not in mdaemon.log()


# A real Prometheus server

def dashboard_queries():
    with open(DASHBOARD) as f:
        dash = json.load(f)
    exprs = []
    for panel in dash["panels"]:
        for t in panel["targets"]:
            exprs.append((panel["title"], t["expr"]))
    return exprs


def grafana_to_promql(expr):
    # The variables Grafana fills in: every host, a window of several
    # scrapes.
    return expr.replace("$__rate_interval", "30s").replace(
        '"$instance"', '".*"')


def test_prometheus_scrapes_daemon(make_daemon, image, tmp_path):
    # A daemon of its own: Prometheus sees absolute counters.
    mdaemon = make_daemon(METRICS_CONF, name="p")
    prom = Prometheus(tmp_path / "prom", [target(mdaemon)]).start()
    try:
        prom.wait_for('up{job="imageio"}',
                      lambda r: r and r[0]["value"][1] == "1")
        ticket, read, written = traffic(mdaemon, image[0])

        def equals(n):
            return lambda r: len(r) == 1 and float(r[0]["value"][1]) == n

        prom.wait_for('sum(imageio_backend_bytes_total{op="read"})',
                      equals(read))
        prom.wait_for('sum(imageio_backend_bytes_total{op="write"})',
                      equals(written))
        prom.wait_for('sum(imageio_http_requests_total{code="206"})',
                      equals(3))
        prom.wait_for('sum(imageio_http_requests_total{code="403"})',
                      equals(2))
        prom.wait_for("imageio_tickets", equals(1))
        assert prom.value('imageio_build_info') == 1
        assert prom.value("process_resident_memory_bytes") > 1024**2

        # Every dashboard expression returns data once a few scrapes of
        # the traffic are in.
        exprs = dashboard_queries()
        assert len(exprs) >= 6
        for title, expr in exprs:
            promql = grafana_to_promql(expr)
            assert "$" not in promql, promql
            prom.wait_for(promql, lambda r: len(r) > 0, timeout=15)
        throughput = prom.query(grafana_to_promql(exprs[0][1]))
        assert {r["metric"]["op"] for r in throughput} >= {"read", "write"}
    finally:
        prom.stop()


def test_counts_outlive_their_threads():
    # Request counts are kept per thread and summed at scrape time; worker
    # threads come and go, and what an ended one counted must stay.
    service = "test-threads"
    start = threading.Barrier(4)

    def work(i):
        start.wait()
        for n in range(250):
            metrics.request_done(service, "GET", 206, 0.001 * (i + 1))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for _ in range(2):  # once folding the ended threads in, once after
        text = metrics.exposition()[0].decode("utf-8")
        assert value(text, "imageio_http_requests_total", service=service,
                     method="GET", code="206") == 1000
        assert value(text, "imageio_http_request_duration_seconds_count",
                     service=service) == 1000
        assert value(text, "imageio_http_request_duration_seconds_bucket",
                     service=service, le="0.0025") == 500
        assert value(text, "imageio_http_request_duration_seconds_sum",
                     service=service) == pytest.approx(2.5)


def test_ended_threads_folded_without_scrapes():
    # A daemon nobody scrapes still starts and retires worker threads all
    # the time: the per-thread counts must not pile up one per thread.
    service = "test-churn"

    def work():
        metrics.request_done(service, "PUT", 200, 0.01)

    for _ in range(50):
        t = threading.Thread(target=work)
        t.start()
        t.join()
    assert len(metrics._tally._live) <= 3  # this thread, the last, slack
    text = metrics.exposition()[0].decode("utf-8")
    assert value(text, "imageio_http_requests_total", service=service) == 50
