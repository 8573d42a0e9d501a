"""The NBD backend: images served by an NBD server, through libnbd.

URLs (SPEC section 4):

- ``nbd:unix:/socket[:exportname=NAME]`` and ``nbd:HOST:PORT[:exportname=NAME]``,
  qemu's legacy forms, connected with ``nbd_connect_unix``/``nbd_connect_tcp``;
- the NBD URI standard, ``nbd://HOST[:PORT]/NAME``, ``nbd+unix:///NAME?socket=/path``,
  ``nbds://`` and ``nbds+unix://`` (TLS, with ``tls-certificates=DIR`` or
  ``tls-psk-file=FILE`` and ``tls-username``), connected by libnbd's
  ``nbd_connect_uri``.

One backend holds one libnbd handle; bulk bytes move in
``imageio._io.nbd`` with several requests in flight and the GIL released.
"""

import contextlib
import logging
import threading
import urllib.parse
import weakref

from .. import errors
from .. import extents
from .._io import nbd
from .. import redact as redact_
from .. import urls
from ..extents import DirtyExtent, Extent, check_range as check_extents_range
from .base import Backend, io_error

log = logging.getLogger("backends.nbd")

# Connections a client may open to one image at once.
MAX_CONNECTIONS = 8

class WriteLedger:
    """Which connections to one export hold writes the server acknowledged
    but nobody flushed yet, shared by every backend of a ticket.

    A server that restarts loses what it had not flushed, and libnbd
    reconnects to a new, empty server as if nothing happened.  So when a
    connection holding unflushed writes is found gone (its command failed,
    it must reconnect, or, idle, its socket shows the server closed it
    when another connection flushes), the export is marked lost: from then
    on every request of the ticket fails, instead of a flush answering
    success over missing data.
    """

    def __init__(self):
        self._lock = threading.Lock()
        # Backends with unflushed writes -> their busy count.
        self._unflushed = weakref.WeakSet()
        self.lost = None

    def wrote(self, backend):
        with self._lock:
            self._unflushed.add(backend)

    def flushed(self, backend, everyone):
        """``backend`` flushed; with ``everyone`` (multi-conn) the flush
        covers every connection's writes."""
        with self._lock:
            if everyone:
                self._unflushed.clear()
            else:
                self._unflushed.discard(backend)

    def has_unflushed(self, backend):
        with self._lock:
            return backend in self._unflushed

    def check_others(self, backend, url):
        """Before ``backend`` flushes: any other connection holding
        unflushed writes whose server went away (seen only on idle ones,
        whose sockets have nothing else to read) means they are lost."""
        with self._lock:
            others = [b for b in self._unflushed if b is not backend]
        for other in others:
            if other.peer_closed():
                return self.connection_lost(url)
        return self.lost

    def connection_lost(self, url):
        """A connection to the export was found gone: if writes were
        waiting for a flush, mark them lost; return the loss message or
        None."""
        with self._lock:
            if len(self._unflushed) and self.lost is None:
                # Told to clients: no URL (the log names it).
                self.lost = (
                    "The NBD server went away before writes were flushed: "
                    "data acknowledged since the last flush may be lost; "
                    "flush failed, start the transfer again")
                log.error("%s: %s", url, self.lost)
            return self.lost


# The ledger of each ticket's export: backends of the same ticket (one per
# connection) share it; a ticket added again starts a new one.
_ledgers = weakref.WeakKeyDictionary()
_ledgers_lock = threading.Lock()


def _ledger(ticket):
    with _ledgers_lock:
        try:
            return _ledgers[ticket]
        except TypeError:  # Not weak-referenceable: its own ledger.
            return WriteLedger()
        except KeyError:
            ledger = _ledgers[ticket] = WriteLedger()
            return ledger


def _without(text, address):
    """``text`` with the export's URL, socket path and host replaced:
    libnbd's messages may name them."""
    parts = [address.url, address.path, address.host]
    if address.kind == "uri":
        # nbd_connect_uri names the socket or a TLS file it could not use.
        u = urllib.parse.urlsplit(address.url)
        parts.append(u.hostname)
        for name, values in urllib.parse.parse_qs(u.query).items():
            if name != "tls-username":
                parts.extend(values)
    parts = [p for p in parts if isinstance(p, str) and p]
    for part in sorted(parts, key=len, reverse=True):
        text = text.replace(part, "<server>")
    return text


def open(ticket, cfg):
    """Connect to the ticket's export; raise errors.BackendError if we
    cannot.  Only adapts a ticket and the daemon's configuration to
    ``connect``."""
    daemon = getattr(cfg, "daemon", None)
    max_connections = min(
        MAX_CONNECTIONS,
        getattr(daemon, "max_connections", MAX_CONNECTIONS) or
        MAX_CONNECTIONS)
    return connect(ticket.url, dirty=bool(getattr(ticket, "dirty", False)),
                   buffer_size=cfg.backend_nbd.buffer_size,
                   max_connections=max_connections, ledger=_ledger(ticket))


def connect(url, dirty=False, buffer_size=8 * 1024**2,
            max_connections=MAX_CONNECTIONS, ledger=None):
    """Return an ``NbdBackend`` connected to the export at ``url`` (any
    form of ``parse_url``).  ``dirty`` asks for the export's dirty bitmap
    context; ``ledger`` (a WriteLedger) is shared with the other backends
    of the same export.  Raises errors.BadRequest for a bad url and
    errors.BackendError when the server cannot be reached."""
    backend = NbdBackend(urls.parse_nbd_url(url), dirty=dirty, buffer_size=buffer_size,
                         max_connections=max_connections, ledger=ledger)
    try:
        backend.reconnect()
    except BaseException:
        backend.close()
        raise
    return backend


class NbdBackend(Backend):
    """One connection to an NBD export (see ``imageio.backends``).

    Built from plain parameters: an ``Address``, whether to ask for the
    dirty bitmap, the size of the buffer for writing zeroes where the
    server cannot (``buffer_size``) and the connections the export allows
    a client (``max_connections``).  ``clone()`` opens another connection to the
    same export (multi-conn), instead of sharing one handle.
    """

    name = "nbd"

    def __init__(self, address, dirty=False, buffer_size=8 * 1024**2,
                 max_connections=MAX_CONNECTIONS, ledger=None):
        self._address = address
        self._ledger = ledger if ledger is not None else WriteLedger()
        self._dirty = dirty
        self._buffer_size = buffer_size
        self._max_connections = max_connections
        self._h = None
        # Requests running on this backend now (peer_closed() must not
        # poll a socket with replies in flight).
        self._busy = 0
        self._zero_buf = None
        # readinto() is the one call made from several threads at once
        # (checksum workers): two pipelined pumps polling one NBD socket
        # take each other's replies and wait for ever.  Hashing stays
        # parallel; reads of one connection take turns.
        self._read_lock = threading.Lock()

    def clone(self):
        """Another connection to the same export, with the same options;
        raise errors.BackendError."""
        other = NbdBackend(self._address, dirty=self._dirty,
                           buffer_size=self._buffer_size,
                           max_connections=self._max_connections,
                           ledger=self._ledger)
        try:
            other.reconnect()
        except BaseException:
            other.close()
            raise
        return other

    # Connection.

    def reconnect(self):
        """(Re)connect to the export; raise errors.BackendError."""
        self._close_handle()
        h = nbd.Handle()
        try:
            self._address.connect(h, self._dirty)
        except nbd.Error as e:
            h.close()
            # The client is told why, not where: the server's address (a
            # host path, a host:port) is for the log.
            log.warning("Cannot connect to NBD server %s: %s",
                        redact_.url(self._address.url), e)
            raise errors.BackendError(
                "Cannot connect to NBD server: {}".format(
                    _without(str(e), self._address))) from None
        self._h = h
        self._size = h.size()
        self._read_only = h.is_read_only()
        self._can_zero = h.can_zero()
        self._can_flush = h.can_flush()
        self._multi_conn = h.can_multi_conn()
        log.debug("Connected to %s size=%d read_only=%s multi_conn=%s "
                  "dirty_context=%s", redact_.url(self._address.url), self._size,
                  self._read_only, self._multi_conn, h.dirty_context)

    def _handle(self):
        if self._ledger.lost is not None:
            raise errors.BackendError(self._ledger.lost)
        # A server that died during an earlier request: reconnect now,
        # unless writes it acknowledged were not flushed yet (they may be
        # gone with it).
        if self._h is None or not self._h.is_connected():
            if self._h is not None:
                self._lost()
                log.warning("NBD connection to %s was lost, reconnecting",
                            redact_.url(self._address.url))
            self.reconnect()
        return self._h

    def _lost(self, cause=None):
        """The connection is gone: raise BackendError if unflushed writes
        went with it."""
        lost = self._ledger.connection_lost(redact_.url(self._address.url))
        if lost is not None:
            raise errors.BackendError(lost) from cause

    @contextlib.contextmanager
    def _command(self, write=False, op=None, offset=0, length=0):
        """Run a command on the handle: busy meanwhile (peer_closed()
        does not poll a socket with replies in flight); a failure that
        took the connection with it may have lost unflushed writes
        (_failed raises); a ``write`` the server acknowledged is owed a
        flush."""
        h = self._handle()
        self._busy += 1
        try:
            yield h
        except nbd.Error as e:
            self._failed(e)
            if op is None:
                raise
            # What the client is told names the request (io_error); the
            # log keeps which server.
            error = io_error(e, op, offset, length)
            log.warning("%s: %s", redact_.url(self._address.url),
                        error.strerror)
            raise error from None
        finally:
            self._busy -= 1
        if write:
            # Only writes the server acknowledged count: a failed request
            # is reported to its client as failed anyway.
            self._ledger.wrote(self)

    def _failed(self, e):
        """A command failed with ``e``: if the connection went with it,
        the writes not yet flushed may be lost (_lost raises)."""
        if self._h is None or not self._h.is_connected():
            self._lost(e)

    def peer_closed(self):
        """True when this idle backend's server closed its connection;
        False while a request runs on it (it will find out itself)."""
        if self._busy:
            return False
        h = self._h
        return h is None or h.peer_closed()

    def _close_handle(self):
        h, self._h = self._h, None
        if h is not None:
            try:
                h.close()
            except nbd.Error as e:
                log.debug("Error closing NBD handle: %s", e)

    def close(self):
        # This connection's unflushed writes are made durable now: after
        # it is gone, a flush on another connection may not cover them
        # (without multi-conn), and a server restart would lose them
        # silently.
        if self._ledger.has_unflushed(self) and self._h is not None \
                and self._ledger.lost is None:
            try:
                if self._h.is_connected() and self._can_flush:
                    self._h.flush()
                    self._ledger.flushed(self, self._multi_conn)
            except nbd.Error as e:
                log.warning("Flushing NBD connection on close failed: %s", e)
        self._close_handle()

    # Properties.

    @property
    def dirty_context(self):
        if not self._dirty or self._h is None:
            return None
        return self._h.dirty_context

    def size(self):
        return self._size

    @property
    def features(self):
        features = {"extents"}
        if not self._read_only:
            # Without WRITE_ZEROES we write zeroes.
            features.add("zero")
            if self._can_flush:
                features.add("flush")
        return frozenset(features)

    @property
    def max_readers(self):
        return self._max_connections

    @property
    def max_writers(self):
        # Without multi-conn, writes on one connection may not be seen by
        # flush on another: one writer.
        return self._max_connections if self._multi_conn else 1

    # I/O.

    # Overlapping NBD requests with the other side of a transfer pays:
    # the server's replies are waited for.
    overlap = True

    def send_to(self, fd, offset, length, buf, timeout, progress):
        """Send the range to the plain socket ``fd``: NBD -> socket in C,
        requests in flight, completed in order into the socket."""
        self._check_range(offset, length)
        with self._command(op="read", offset=offset, length=length) as h:
            h.send_to_socket(fd, offset, length, buf, timeout, progress)

    def recv_from(self, fd, offset, length, buf, timeout, progress):
        """Receive up to ``length`` bytes from the plain socket ``fd`` and
        write them at ``offset``: socket -> NBD in C, requests in flight.
        Returns the bytes received (fewer when the peer closed early)."""
        self._check_range(offset, length)
        with self._command(write=True, op="write", offset=offset,
                           length=length) as h:
            return h.recv_from_socket(fd, offset, length, buf, timeout,
                                      progress)

    def write(self, data, offset):
        n = len(data)
        self._check_range(offset, n)
        with self._command(write=True, op="write", offset=offset,
                           length=n) as h:
            h.pwrite_pipelined(data, offset, n)

    def readinto(self, buf, offset, length):
        self._check_range(offset, length)
        with self._read_lock, self._command(op="read", offset=offset,
                                            length=length) as h:
            h.pread_pipelined(buf, offset, length)
        return memoryview(buf)[:length]

    def zero(self, offset, length, punch_hole):
        self._check_range(offset, length)
        if length == 0:
            return
        with self._command(write=True, op="zero", offset=offset,
                           length=length) as h:
            self._zero(h, offset, length, punch_hole)

    def _zero(self, h, offset, length, punch_hole):
        if punch_hole and h.reads_as_zero(offset, length):
            # Sparse ticket, and the range already reads as zeroes: a
            # WRITE_ZEROES would change nothing a reader sees, yet costs a
            # server round trip and, on a fresh qcow2, zero-flagged L2
            # entries for the whole range.  Restores of mostly empty disks
            # zero most of the image this way.
            return
        if self._can_zero:
            h.zero(offset, length, no_hole=not punch_hole)
            return
        # The server cannot zero: write zeroes.
        if self._zero_buf is None:
            self._zero_buf = bytearray(min(self._buffer_size, 8 * 1024**2))
        step = len(self._zero_buf)
        while length:
            n = min(step, length)
            h.pwrite_pipelined(self._zero_buf, offset, n)
            offset += n
            length -= n

    def flush(self):
        with self._command(op="flush", offset=0, length=self._size) as h:
            lost = self._ledger.check_others(self,
                                             redact_.url(self._address.url))
            if lost is not None:
                raise errors.BackendError(lost)
            if self._can_flush:
                h.flush()
        self._ledger.flushed(self, self._multi_conn)

    def extents(self, offset=0, length=None, context="zero"):
        # Block status for the asked range only: a piece of a huge image
        # costs what the piece holds, not a walk from the start.
        end = check_extents_range(offset, length, self._size)
        if context == "zero":
            h = self._handle()
            return [Extent(*e) for e in h.zero_extents(offset, end - offset)]
        if context == "dirty":
            if not self._dirty:
                raise errors.NotFound(
                    "Ticket does not support dirty extents")
            h = self._handle()
            if h.dirty_context is None:
                raise errors.NotFound(
                    "NBD export {} has no dirty bitmap".format(
                        redact_.url(self._address.url)))
            return [DirtyExtent(*e)
                    for e in h.dirty_extents(offset, end - offset)]
        raise errors.NotFound("Unknown extents context {!r}".format(context))

    def _check_range(self, offset, length):
        extents.check_io(offset, length, self._size)
