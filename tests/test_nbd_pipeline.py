"""imageio.nbd.pipeline: lanes of one NBD connection, with real threads
and sockets (the daemon-level tests are in test_nbd_server.py)."""

import os
import socket
import threading

import pytest

from imageio.nbd import pipeline


class Lanes:
    """What a connection gives the pipeline: a backend and buffer per
    lane (here tokens), recorded as they are opened and closed."""

    def __init__(self, fail_open=False):
        self.opened = []
        self.closed = []
        self.failures = []
        self.fail_open = fail_open

    def open(self):
        if self.fail_open:
            return None
        token = ("backend", len(self.opened)), bytearray(16)
        self.opened.append(token)
        return token

    def close(self, backend, buf):
        self.closed.append((backend, buf))

    def failed(self, e):
        self.failures.append(e)


def make(lanes, n=pipeline.LANES):
    return pipeline.Pipeline(lanes.open, lanes.close, lanes.failed, lanes=n)


def test_requests_run_at_once():
    # The first request can only finish once the second one ran: with one
    # request at a time this would wait forever.
    lanes = Lanes()
    pipe = make(lanes, 2)
    second_ran = threading.Event()
    done = []

    def first(lane):
        done.append(("first", second_ran.wait(10)))

    def second(lane):
        second_ran.set()
        done.append(("second", True))

    a = pipe.acquire()
    pipe.submit(a, first)
    b = pipe.acquire()
    assert b is not a
    pipe.submit(b, second)
    pipe.drain()
    assert sorted(done) == [("first", True), ("second", True)]
    pipe.close()


def test_acquire_waits_for_a_free_lane_and_reuses_it():
    lanes = Lanes()
    pipe = make(lanes, 1)
    go = threading.Event()
    a = pipe.acquire()
    pipe.submit(a, lambda lane: go.wait(10))
    got = []
    t = threading.Thread(target=lambda: got.append(pipe.acquire()))
    t.start()
    t.join(0.3)
    assert t.is_alive()  # All lanes busy: it waits.
    go.set()
    t.join(10)
    assert got == [a] and len(lanes.opened) == 1
    pipe.release(a)
    pipe.close()


def lane_threads():
    return [t for t in threading.enumerate() if t.name == "nbd-lane"]


def test_close_stops_every_lane_and_releases_it():
    lanes = Lanes()
    pipe = make(lanes, 3)
    taken = [pipe.acquire() for _ in range(3)]
    for lane in taken:
        pipe.submit(lane, lambda lane: None)
    assert len(lane_threads()) == 3
    pipe.close()
    assert sorted(lanes.closed) == sorted(lanes.opened)
    assert lane_threads() == []
    # The next burst opens lanes again.
    lane = pipe.acquire()
    assert lane is not None and len(lanes.opened) == 4
    pipe.release(lane)
    pipe.close()


def test_failed_task_stops_the_connection_and_the_pipeline():
    lanes = Lanes()
    pipe = make(lanes, 2)

    def broken(lane):
        raise BrokenPipeError("client went away")

    pipe.submit(pipe.acquire(), broken)
    pipe.drain()
    assert [type(e) for e in lanes.failures] == [BrokenPipeError]
    assert pipe.acquire() is None  # Served in place (and closing).
    pipe.close()


def test_no_lane_without_a_buffer():
    lanes = Lanes(fail_open=True)
    pipe = make(lanes, 2)
    assert pipe.acquire() is None
    assert pipe.busy == 0
    pipe.close()


@pytest.mark.parametrize("blocking", [True, False])
def test_send_parts_waits_for_a_full_socket(blocking):
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(blocking)
        parts = [b"h" * 16, os.urandom(4 * 1024**2), b"t" * 3]
        got = bytearray()

        def drain():
            while len(got) < sum(map(len, parts)):
                got.extend(b.recv(65536))

        t = threading.Thread(target=drain)
        t.start()
        pipeline.send_parts(a.fileno(), parts, 10)
        t.join(10)
        assert bytes(got) == b"".join(parts)


def test_send_parts_times_out_when_nobody_reads():
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        with pytest.raises(TimeoutError):
            pipeline.send_parts(a.fileno(), [b"x" * (16 * 1024**2)], 0.2)
