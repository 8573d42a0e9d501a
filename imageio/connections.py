"""Client connections: one selector thread per service, a worker pool.

As nbdkit's ``connections.c``: this module owns a connection's life.  A
connection that is not running a request (TLS handshake in progress,
keep-alive between requests, a client that sent nothing yet) waits in one
epoll selector and costs a file descriptor and a few small objects, not a
thread or a buffer.  When a whole request head has arrived (parsed by the
pure ``httpparse.parse_head`` on each readable event) the connection goes
to a worker, which serves it with ``http.Connection.serve_one`` and keeps
serving while the client's next request is already there; otherwise it
hands the connection back through a wake-up pipe.

Deadlines (header_timeout for a head, the inactivity timeout between
requests) live in one heap.  Running out of file descriptors (EMFILE,
ENFILE) or threads is survived: the oldest connection that never sent a
request makes room, or accepting pauses with a growing back-off; the log
says so at most once every ratelog.LOG_INTERVAL seconds.
"""

import collections
import errno
import heapq
import itertools
import logging
import os
import select
import selectors
import socket
import threading
import time

from . import ratelog
from . import workers

log = logging.getLogger("connections")

# A worker waits this long for a keep-alive client's next request before
# handing the connection back to the selector: a client sending requests
# back to back (a ranged-GET loop) is served without the selector's round
# trip, and an idle one holds a thread for no longer than this.
LINGER = 0.02

# Back-off of accept() after EMFILE/ENFILE, and of a failed thread start.
BACKOFF_MIN = 0.05
BACKOFF_MAX = 1.0


# File descriptors kept free for everything but client connections
# (backends, NBD sockets, log files, the other services).
FD_RESERVE = 256

# Accepts per readable event of the listening socket, so one service's
# flood cannot starve its own connections' events.
ACCEPT_BATCH = 64

_ids = itertools.count(1)

# Client states.
HANDSHAKE = "handshake"
HEAD = "head"
BUSY = "busy"
CLOSED = "closed"


def fd_limit():
    """The soft RLIMIT_NOFILE."""
    import resource
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Client:
    """A connection as the selector sees it."""

    __slots__ = ("conn", "state", "deadline", "seq", "served", "events",
                 "accepted")

    def __init__(self, conn, state, deadline):
        self.conn = conn
        self.state = state
        self.deadline = deadline
        self.seq = 0
        # Requests served: a client that never sent one is the first to
        # make room when file descriptors run out.
        self.served = 0
        self.events = 0
        self.accepted = time.monotonic()


class _Room:
    """Who makes room at max_clients, oldest first: connections that never
    sent a request, then idle ones that never used a ticket (a keep-alive
    pinger of OPTIONS or 404s must not keep a ticket holder out), then
    busy ones that never did.  The selector thread's alone."""

    def __init__(self, server):
        self._server = server
        # Clients that never sent a request, oldest first.
        self._fresh = collections.OrderedDict()
        # Clients that sent requests but never used a ticket, oldest first.
        self._unbound = collections.OrderedDict()

    def added(self, client):
        self._fresh[client] = None

    def busy(self, client):
        self._fresh.pop(client, None)
        self._unbound.pop(client, None)

    def idle(self, client):
        if not client.conn.bound:
            # The oldest keeps its place.
            self._unbound.setdefault(client, None)

    forget = busy

    def make(self):
        """Close a connection to make room; False if none could go now
        (a busy one may have been told to stop: it goes when its worker
        closes it)."""
        server = self._server
        while self._fresh:
            client, _ = self._fresh.popitem(last=False)
            if client.state != BUSY and client.served == 0:
                log.debug("%s: closing %s to make room", server.name,
                          client.conn.name)
                server._close(client)
                return True
        while self._unbound:
            client, _ = self._unbound.popitem(last=False)
            if client.state in (BUSY, CLOSED) or client.conn.bound:
                # Running a request now (back when it returns), closed,
                # or bound a ticket since.
                continue
            log.debug("%s: closing %s (never used a ticket) to make room",
                      server.name, client.conn.name)
            server._close(client)
            return True
        busy = [c for c in server.clients() if c.state == BUSY
                and not c.conn.bound and not c.conn.closing]
        if busy:
            client = min(busy, key=lambda c: c.accepted)
            log.debug("%s: stopping %s (never used a ticket) to make room",
                      server.name, client.conn.name)
            client.conn.shutdown()
        return False


class _Deadlines:
    """The clients' deadlines (a head's header_timeout, the inactivity
    timeout between requests) in one heap.  The selector thread's alone."""

    def __init__(self):
        self._heap = []
        self._seq = itertools.count()

    def arm(self, client, live):
        client.seq = next(self._seq)
        heapq.heappush(self._heap, (client.deadline, client.seq, client))
        if len(self._heap) > 4 * live + 64:
            # Entries of re-armed and closed clients pile up (they are
            # skipped when popped): keep the heap proportional.
            self._heap = [(c.deadline, c.seq, c) for _, seq, c in self._heap
                          if seq == c.seq and c.state != BUSY]
            heapq.heapify(self._heap)

    def next(self):
        """The earliest deadline, or None."""
        return self._heap[0][0] if self._heap else None

    def expired(self, now):
        """Yield the clients whose deadline passed (and still holds)."""
        while self._heap and self._heap[0][0] <= now:
            deadline, seq, client = heapq.heappop(self._heap)
            if seq != client.seq or client.state == BUSY:
                continue  # Re-armed since, or running.
            yield client


class _Acceptor:
    """The listening socket's side of the selector: accepts in batches,
    pauses at max_clients (until a connection closes) and after accept
    failures (EMFILE: with a growing back-off), and makes room where the
    policy (_Room) allows.  The selector thread's alone."""

    def __init__(self, server, listener):
        self._server = server
        self.listener = listener
        self.accepting = False
        # Paused at max_clients: resume when a connection closes.
        self.full = False
        self.resume_at = 0.0
        self._backoff = BACKOFF_MIN

    def timeout(self, now):
        """Seconds until accepting resumes by itself, or None."""
        if self.accepting or self.full:
            return None
        return max(0.0, self.resume_at - now)

    def step(self):
        """Resume accepting when its pause is over."""
        if self.accepting:
            return
        if self.full:
            if self._server.connection_count() < self._server.max_clients:
                self.resume()
        elif time.monotonic() >= self.resume_at:
            self.resume()

    def resume(self):
        if not self.accepting:
            self._server._sel.register(self.listener, selectors.EVENT_READ,
                                       "listen")
            self.accepting = True
            self.full = False

    def pause(self, delay):
        if self.accepting:
            self._server._sel.unregister(self.listener)
            self.accepting = False
        self.resume_at = time.monotonic() + delay

    def accept(self):
        server = self._server
        for _ in range(ACCEPT_BATCH):
            if server.connection_count() >= server.max_clients:
                if not self._pending():
                    return
                if server._room.make():
                    continue
                # Until a connection closes.
                self.pause(0)
                self.full = True
                server._ratelog.warning(
                    "max_clients", "%s: %d connections, the most allowed "
                    "([daemon] max_clients); not accepting more",
                    server.name, server.max_clients)
                return
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                               errno.ENOMEM) and server._room.make():
                    continue
                self.pause(self._backoff)
                server._ratelog.warning(
                    "accept", "%s: accept failed, pausing %.2f s: %s",
                    server.name, self._backoff, e)
                self._backoff = min(self._backoff * 2, BACKOFF_MAX)
                return
            self._backoff = BACKOFF_MIN
            server._add(sock)

    def _pending(self):
        """Whether a connection waits in the backlog: at max_clients
        nobody is closed to make room for no one (the connection accepted
        last, before it could send its request)."""
        p = select.poll()
        p.register(self.listener.fileno(), select.POLLIN)
        return bool(p.poll(0))


class Server:
    """Accepts and holds the connections of one service.

    ``make_conn(sock, name)`` returns the ``http.Connection`` for an
    accepted (and, with ``ssl_context``, TLS-wrapped) socket.
    """

    def __init__(self, name, sock, make_conn, ssl_context=None,
                 max_clients=10000, header_timeout=10, idle_timeout=60):
        self.name = name
        self._listener = sock
        self._make_conn = make_conn
        self._ssl = ssl_context
        self.max_clients = max(1, min(max_clients,
                                      fd_limit() - FD_RESERVE))
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self._ratelog = ratelog.RateLimitedLog(log)
        self.workers = workers.Workers(name, self._ratelog)
        # Touched by workers and the selector thread.
        self._lock = threading.Lock()
        self._clients = set()
        self._returned = []
        # Only the selector thread touches these.
        self._sel = selectors.DefaultSelector()
        self._deadlines = _Deadlines()
        self._room = _Room(self)
        self._acceptor = _Acceptor(self, sock)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._running = False
        self._thread = None
        # Callbacks: per connection open/close (metrics may count them).
        self.on_open = None
        self.on_close = None

    @property
    def address(self):
        return self._listener.getsockname()

    def connection_count(self):
        with self._lock:
            return len(self._clients)

    def clients(self):
        with self._lock:
            return list(self._clients)

    # Life.

    def start(self):
        self._listener.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._acceptor.resume()
        self._running = True
        self._thread = threading.Thread(target=self._loop, name=self.name,
                                        daemon=True)
        self._thread.start()

    def stop(self):
        """Stop accepting and shut down every connection."""
        self._running = False
        self._wake()
        if self._thread:
            self._thread.join(5)
        self._listener.close()
        with self._lock:
            clients = list(self._clients)
            returned, self._returned = self._returned, []
        for client in clients:
            client.conn.shutdown()
            # Idle, or handed back by a worker the selector never saw again.
            if client.state != BUSY or client in returned:
                self._close(client)
        self.workers.stop()

    def wait_connections(self, timeout):
        """Wait until connections end; return how many are left."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.connection_count():
                return 0
            time.sleep(0.05)
        return self.connection_count()

    # The selector thread.

    def _loop(self):
        while self._running:
            try:
                self._step()
            except Exception:
                log.exception("%s: selector step failed", self.name)
                time.sleep(BACKOFF_MIN)

    def _step(self):
        now = time.monotonic()
        timeout = 1.0
        deadline = self._deadlines.next()
        if deadline is not None:
            timeout = min(timeout, max(0.0, deadline - now))
        resume = self._acceptor.timeout(now)
        if resume is not None:
            timeout = min(timeout, resume)
        if self.workers.pending():
            timeout = min(timeout, max(0.0, self.workers.retry_at - now))
        for key, mask in self._sel.select(timeout):
            if key.data == "listen":
                self._acceptor.accept()
            elif key.data == "wake":
                self._drain_wake()
            else:
                self._ready(key.data)
        self._take_back()
        self._expire()
        self._acceptor.step()
        self.workers.retry()

    def _wake(self):
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # Already awake.

    def _drain_wake(self):
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    # Accepting.

    def _add(self, sock):
        name = "{}/{}".format(self.name, next(_ids))
        try:
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            state = HEAD
            conn = self._make_conn(sock, name)
            if self._ssl:
                conn.sock.start_tls(self._ssl)
                state = HANDSHAKE
        except Exception as e:
            sock.close()
            self._ratelog.warning("setup", "%s: cannot set up a connection: "
                                  "%s", self.name, e)
            return
        client = Client(conn, state, time.monotonic() + self.header_timeout)
        with self._lock:
            self._clients.add(client)
        self._room.added(client)
        if self.on_open:
            self.on_open()
        self._watch(client, selectors.EVENT_READ)

    # Waiting clients.

    def _watch(self, client, events):
        fd = client.conn.sock.fileno()
        if client.events:
            if client.events != events:
                self._sel.modify(fd, events, client)
        else:
            self._sel.register(fd, events, client)
        client.events = events
        self._arm(client)

    def _unwatch(self, client):
        if client.events:
            try:
                self._sel.unregister(client.conn.sock.fileno())
            except (KeyError, ValueError, OSError):
                pass
            client.events = 0

    def _arm(self, client):
        self._deadlines.arm(client, len(self._clients))

    def _expire(self):
        for client in self._deadlines.expired(time.monotonic()):
            log.debug("%s: %s timed out (%s)", self.name, client.conn.name,
                      client.state)
            self._close(client)

    def _ready(self, client):
        conn = client.conn
        if client.state == HANDSHAKE:
            try:
                wait = conn.sock.handshake()
            except OSError as e:  # ssl.SSLError too.
                log.debug("%s: TLS handshake failed: %s", conn.name, e)
                self._close(client)
                return
            if wait is not None:
                self._watch(client, wait)
                return
            client.state = HEAD
            conn.tls_pending = False
            self._watch(client, selectors.EVENT_READ)
        try:
            got = conn.reader.fill()
        except OSError as e:  # ssl.SSLError too.
            log.debug("%s: receive failed: %s", conn.name, e)
            self._close(client)
            return
        if conn.reader.eof:
            self._close(client)
            return
        if got and client.served and client.deadline > \
                time.monotonic() + self.header_timeout:
            # A keep-alive client started its next request.
            client.deadline = time.monotonic() + self.header_timeout
            self._arm(client)
        self._try_head(client)

    def _try_head(self, client):
        reader = client.conn.reader
        discarding = reader.discarding
        try:
            head = reader.parse_head()
        except ConnectionError as e:
            # Closing after a refused body was dropped.
            log.debug("%s: %s", client.conn.name, e)
            self._close(client)
            return
        except Exception as e:  # HTTPError: answered by a worker.
            self._dispatch(client, None, e)
            return
        if head is not None:
            self._dispatch(client, head, None)
        elif discarding and not reader.discarding \
                and not reader.peek_buffered():
            # A refused body is all dropped: the client may idle now.
            client.deadline = time.monotonic() + (
                client.conn.timeout or self.idle_timeout)
            self._arm(client)

    def _dispatch(self, client, head, error):
        self._unwatch(client)
        client.state = BUSY
        self._room.busy(client)
        self.workers.submit(self._serve, client, head, error)

    # Workers.

    def _serve(self, client, head, error):
        conn = client.conn
        keep = False
        try:
            conn.sock.settimeout(conn.timeout)
            if error is not None:
                conn.serve_error(error)
                return
            keep = self._serve_request(client, head)
            while keep and not conn.closing:
                head = conn.next_head(LINGER)
                if head is None:
                    break
                keep = self._serve_request(client, head)
        except Exception as e:
            keep = False
            if getattr(e, "status", None) and not conn.busy:
                # A malformed next head (HTTPError).
                try:
                    conn.serve_error(e)
                except Exception as e2:
                    conn.log_failure(e2)
            else:
                conn.log_failure(e)
        finally:
            if keep and not conn.closing and self._running:
                conn.idle()
                self._give_back(client)
            else:
                self._close(client)

    def _serve_request(self, client, head):
        client.served += 1
        return client.conn.serve_one(head)

    def _give_back(self, client):
        with self._lock:
            self._returned.append(client)
        self._wake()

    def _take_back(self):
        with self._lock:
            returned, self._returned = self._returned, []
        now = time.monotonic()
        for client in returned:
            conn = client.conn
            try:
                conn.sock.setblocking(False)
            except OSError:
                self._close(client)
                continue
            # A connection that asked for TLS in place (NBD's STARTTLS)
            # comes back for its handshake.
            client.state = HANDSHAKE if conn.tls_pending else HEAD
            timeout = conn.timeout if conn.timeout else self.idle_timeout
            # Bytes of the next head may be buffered already; the rest of
            # a refused body must come within header_timeout in all.
            client.deadline = now + (self.header_timeout
                                     if conn.reader.peek_buffered()
                                     or conn.reader.discarding
                                     else timeout)
            self._room.idle(client)
            self._watch(client, selectors.EVENT_READ)
            if conn.sock.pending():
                self._ready(client)

    # Closing.

    def _close(self, client):
        """Close a client's connection (any thread; never one that another
        thread is serving)."""
        with self._lock:
            if client not in self._clients:
                return
            self._clients.discard(client)
        if threading.current_thread() is self._thread:
            self._unwatch(client)
            self._room.forget(client)
        client.state = CLOSED
        client.seq = -1
        try:
            client.conn.close()
        except Exception:
            log.exception("%s: error closing %s", self.name,
                          client.conn.name)
        if self.on_close:
            self.on_close()
        if threading.current_thread() is not self._thread:
            self._wake()

