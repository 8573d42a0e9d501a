"""Shared pieces of the end-to-end scenarios: fixtures, tickets and the
measurement that turns rounds into MiB/s (or req/s) and server CPU.

Scenario modules import the fixtures with ``from bench.e2e import *`` (no
conftest.py, so the micro benchmarks in bench/ stay independent).

Every measured test stores in ``benchmark.extra_info``:

- scenario, server (kind), label: what was measured on what;
- unit and higher_is_better: how to read value;
- rep: which repeat (each scenario runs REPEATS times per server,
  interleaved across servers);
- value: MiB/s, req/s or seconds of this repeat's round;
- cpu, cpu_unit: the server's CPU per GiB (or per 1000 requests, or per
  run), from /proc, children included;
- client_cpu: the same for the client (curl processes or this process).

bench/report.py merges the repeats and turns them into ratios ours/peer.
"""

import os
import resource
import time

import pytest

from . import clients, images, peers

MiB = images.MiB
GiB = images.GiB

QUICK = bool(os.environ.get("IMAGEIO_BENCH_QUICK"))
# Each scenario runs REPEATS times per server, interleaved: imageio,
# established, nginx, imageio, established, nginx, ... so that a noisy
# neighbour or a drifting machine hits every server alike. Ratios are the
# median of the per-repeat (paired) ratios.
REPEATS = int(os.environ.get("IMAGEIO_BENCH_REPEATS", 4 if QUICK else 6))
REQUESTS = int(os.environ.get("IMAGEIO_BENCH_REQUESTS",
                              1000 if QUICK else 3000))
# Restrict the servers (comma separated kinds), e.g. "established,nginx"
# while our daemon does not start yet.
ONLY = {kind for kind in os.environ.get("IMAGEIO_BENCH_SERVERS", "").split(",")
        if kind}

OURS = "imageio"

__all__ = ["servers", "server", "get_server", "measure", "ticket",
           "servers_param", "OURS", "QUICK", "REPEATS", "REQUESTS", "MiB",
           "GiB"]


def servers_param(kinds, argname="server", repeats=None):
    """Parametrize a scenario by (server, rep): every server, ``repeats``
    (default REPEATS) times, interleaved. The server argument is indirect
    (started on demand)."""
    repeats = REPEATS if repeats is None else repeats
    params = [(kind, rep) for rep in range(repeats) for kind in kinds]
    return pytest.mark.parametrize(
        f"{argname},rep", params, indirect=[argname],
        ids=[f"{kind}-{rep}" for kind, rep in params])


@pytest.fixture(scope="session")
def servers():
    s = peers.Servers()
    yield s
    s.stop()


@pytest.fixture
def server(request, servers):
    """The server of the test's indirect parameter, started on demand:
    ``@pytest.mark.parametrize("server", ["imageio", ...], indirect=True)``.
    """
    return get_server(servers, request.param)


def get_server(servers, kind):
    """servers.get(kind), or skip the test saying why it is unavailable."""
    # "imageio" selects its backend twin "imageio-backend" too.
    if ONLY and kind not in ONLY and kind.split("-")[0] not in ONLY:
        pytest.skip(f"{kind} not selected (IMAGEIO_BENCH_SERVERS)")
    try:
        return servers.get(kind)
    except peers.Unavailable as e:
        pytest.skip(f"{kind} unavailable: {e}")


def ticket(server, name, image, ops=("read",), url=None):
    """Give server access to image under name (through url when given: a
    proxy ticket); check a read matches the image."""
    # name -> None when ready, or the reason it is not: a ticket that
    # failed once is skipped by the scenarios after it too.
    added = getattr(server, "_bench_tickets", None)
    if added is None:
        added = server._bench_tickets = {}
    if name in added:
        if added[name] is not None:
            pytest.skip(added[name])
        return server.path(name)
    added[name] = f"{server.kind}: ticket {name} not ready"
    try:
        server.add_ticket(name, image, ops=ops, url=url)
    except (peers.Unavailable, OSError) as e:
        added[name] = f"{server.kind}: cannot add ticket {name}: {e}"
        pytest.skip(added[name])
    path = server.path(name)
    if "read" in ops or "write" not in ops:
        # One ranged read inside the first data segment, unaligned: a fast
        # but wrong server must not produce numbers.
        offset, length = MiB + 12345, 64 * 1024 + 7
        with open(image, "rb") as f:
            f.seek(offset)
            expected = f.read(length)
        conn = clients.connect(server, "unix")
        try:
            data = clients.read_range(conn, path, offset, length)
        except (clients.ClientError, OSError) as e:
            added[name] = f"{server.kind}: cannot read {name}: {e}"
            pytest.skip(added[name])
        finally:
            conn.close()
        if data != expected:
            added[name] = f"{server.kind}: {name}: wrong data"
            raise AssertionError(f"{server.label}: {name} at {offset}: "
                                 "wrong data")
    added[name] = None
    return path


def _client_cpu():
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def measure(benchmark, scenario, server, rep, fn, *, amount, unit="MiB/s",
            cpu_per=None):
    """Measure one round of fn through pytest-benchmark (after one warm-up
    round on the first repeat).

    amount: what one round moves, in the unit's numerator (MiB for MiB/s,
    requests for req/s); unit "s" reports the round's time (lower is better).
    cpu_per: (divisor, unit) for the CPU figure, default per GiB.
    """
    warmup = 1 if rep == 0 else 0
    samples = []

    def one_round():
        c0 = server.cpu_seconds()
        k0 = _client_cpu()
        t0 = time.perf_counter()
        fn()
        t = time.perf_counter() - t0
        k = _client_cpu() - k0
        c = server.cpu_seconds() - c0
        samples.append((t, c, k))

    benchmark.group = scenario
    benchmark.pedantic(one_round, rounds=1, iterations=1,
                       warmup_rounds=warmup)
    t, c, k = samples[-1]
    if unit == "s":
        value, higher = t, False
    else:
        value, higher = amount / t, True
    if cpu_per is None:
        cpu_per = (amount / 1024, "s/GiB") if unit == "MiB/s" else (1, "s")
    divisor, cpu_unit = cpu_per
    info = benchmark.extra_info
    info.update({
        "scenario": scenario,
        "server": server.kind,
        "label": server.label,
        "rep": rep,
        "unit": unit,
        "higher_is_better": higher,
        "value": value,
        "seconds": t,
        "cpu": c / divisor,
        "client_cpu": k / divisor,
        "cpu_unit": cpu_unit,
    })
    return info
