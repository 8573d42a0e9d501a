"""Requests of one NBD connection served at once, as qemu-nbd's coroutines
serve them: the connection's worker reads a request (and a write's
payload, into a lane's buffer) and hands it to a lane, then reads the next
one while the lane writes to storage and replies.  Replies may go out of
order; the client matches them by cookie.

A lane is a thread with its own clone of the connection's backend and its
own aligned buffer from the daemon's pool.  Lanes start with the first
pipelined request of a burst and end when the connection goes idle, so an
idle connection holds no thread, no buffer and no extra file descriptor.

Only plain sockets pipeline (the unix socket, TCP with TLS off): an
OpenSSL connection is not safe for one thread's read while another writes,
so TLS connections serve one request at a time.  Replies from every thread
go out under one lock, with C send loops (``_io.stream``) or ``writev``,
which poll on EAGAIN whatever the socket's timeout mode is.
"""

import logging
import os
import queue
import select
import threading

log = logging.getLogger("nbd")

# Requests of one connection in flight at once (nbdcopy keeps up to 64,
# qemu-img 8).  Measured with nbdcopy into a /dev/shm ticket over the unix
# socket (bench/nbdserve.py, docs/benchmarks.md): 1, 2 and 4 lanes alike on
# 2 cores, where the receive is the serial part; slower storage has more
# write latency to hide.
LANES = 4


class Lane:
    """A thread serving one request at a time with its own backend and
    buffer."""

    __slots__ = ("backend", "buf", "_tasks", "_thread")

    def __init__(self, backend, buf, pipeline):
        self.backend = backend
        self.buf = buf
        self._tasks = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=pipeline._run, args=(self,), daemon=True,
            name="nbd-lane")
        self._thread.start()

    def put(self, task):
        self._tasks.put(task)

    def get(self):
        return self._tasks.get()

    def stop(self):
        self._tasks.put(None)
        self._thread.join()


class Pipeline:
    """The lanes of one connection.

    ``open_lane()`` gives a clone of the connection's backend and a buffer
    (or None when there is none to give); ``close_lane(backend, buf)``
    releases them.  A task that raises ends the connection: ``on_fail(e)``
    (the connection's owner stops it); the task replies to its client
    itself, under the connection's send lock."""

    def __init__(self, open_lane, close_lane, on_fail, lanes=LANES):
        self._open_lane = open_lane
        self._close_lane = close_lane
        self._on_fail = on_fail
        self._lanes = lanes
        self._max = lanes
        self._cond = threading.Condition()
        self._free = []
        self._all = []
        self._busy = 0
        # The error that ended a lane's request and the connection.
        self.failed = None

    @property
    def busy(self):
        return self._busy

    def acquire(self):
        """A free lane, waiting for one when all are busy; None when no
        lane can be had (no buffer, no thread): serve in place."""
        with self._cond:
            while True:
                if self.failed is not None:
                    return None
                if self._free:
                    self._busy += 1
                    return self._free.pop()
                if len(self._all) < self._max:
                    break
                self._cond.wait()
            # Counted while it opens, so no other thread waits for it.
            self._busy += 1
            self._all.append(None)
        lane = None
        try:
            lane = self._new_lane()
        finally:
            with self._cond:
                self._all.remove(None)
                if lane is None:
                    self._busy -= 1
                    # Serve the rest of this burst with the lanes there.
                    self._max = len(self._all)
                    self._cond.notify_all()
                else:
                    self._all.append(lane)
        return lane

    def _new_lane(self):
        opened = self._open_lane()
        if opened is None:
            return None
        backend, buf = opened
        try:
            return Lane(backend, buf, self)
        except RuntimeError as e:
            # No thread (RLIMIT_NPROC, the pids cgroup): fewer lanes.
            log.warning("cannot start an NBD lane: %s", e)
            self._close_lane(backend, buf)
            return None

    def release(self, lane):
        """Give back a lane ``acquire`` gave, unused."""
        with self._cond:
            self._free.append(lane)
            self._busy -= 1
            self._cond.notify_all()

    def submit(self, lane, func, *args):
        """Run ``func(lane, *args)`` on ``lane``, which is free again when
        it returns."""
        lane.put((func, args))

    def _run(self, lane):
        while True:
            task = lane.get()
            if task is None:
                return
            func, args = task
            try:
                func(lane, *args)
            except BaseException as e:
                with self._cond:
                    if self.failed is None:
                        self.failed = e
                try:
                    self._on_fail(e)
                except Exception:
                    log.exception("stopping a failed NBD connection")
            finally:
                with self._cond:
                    self._free.append(lane)
                    self._busy -= 1
                    self._cond.notify_all()

    def drain(self):
        """Wait until no lane is busy (before a request that must follow
        every earlier one: FLUSH, BLOCK_STATUS, an oversized write)."""
        with self._cond:
            while self._busy:
                self._cond.wait()

    def close(self):
        """Drain, then stop every lane and release its backend and buffer
        (the connection goes idle or closes)."""
        self.drain()
        with self._cond:
            lanes, self._all, self._free = self._all, [], []
            self._max = self._lanes if self.failed is None else 0
        for lane in lanes:
            lane.stop()
            self._close_lane(lane.backend, lane.buf)


def send_parts(fd, parts, timeout):
    """All of ``parts`` to ``fd`` with ``writev``, polling when the socket
    is full (its O_NONBLOCK flag belongs to the connection's worker);
    TimeoutError when it takes nothing for ``timeout`` seconds."""
    parts = [memoryview(p) for p in parts if len(p)]
    poller = None
    while parts:
        try:
            n = os.writev(fd, parts)
        except BlockingIOError:
            if poller is None:
                poller = select.poll()
                poller.register(fd, select.POLLOUT)
            if not poller.poll(None if timeout is None else timeout * 1000):
                raise TimeoutError("Client took nothing for {} seconds"
                                   .format(timeout)) from None
            continue
        while parts and n >= len(parts[0]):
            n -= len(parts[0])
            parts.pop(0)
        if parts and n:
            parts[0] = parts[0][n:]
