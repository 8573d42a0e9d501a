"""Tickets: validation, expiry, cancellation and transfer accounting.

A ticket grants access to one image for a limited time.  Tickets live in
memory only.  Every method is thread-safe: connection threads use tickets
while the control service adds, changes and deletes them.
"""

import logging
import threading
import time
import unicodedata

from . import errors
from . import urls
from .redact import short_id
from .accounting import Operation, RangeSet, RateMeter

log = logging.getLogger("tickets")

VALID_OPS = ("read", "write")

# Longest time cancel() lets a running operation reach its next chunk
# before shutting its connection down.
CANCEL_GRACE = 5.0

# field -> (type, required, default)
FIELDS = {
    "uuid": (str, True, None),
    "size": (int, True, None),
    "url": (str, True, None),
    "timeout": (int, True, None),
    "ops": (list, True, None),
    "sparse": (bool, False, False),
    "dirty": (bool, False, False),
    "inactivity_timeout": (int, False, None),
    "transfer_id": (str, False, None),
    "filename": (str, False, None),
}


# Upper bounds of integer fields: sizes fit an NBD/off_t offset, timeouts
# fit a float clock (10**400 seconds would overflow it).  About 136 years.
MAX_SIZE = 2**63 - 1
MAX_TIMEOUT = 2**32
LIMITS = {"size": MAX_SIZE, "timeout": MAX_TIMEOUT,
          "inactivity_timeout": MAX_TIMEOUT}


def validate(d, default_inactivity_timeout=60):
    """Return a clean copy of ticket dict ``d``, or raise BadRequest naming
    the field.  Unknown fields are dropped (forward compatibility)."""
    if not isinstance(d, dict):
        raise errors.BadRequest(
            "Invalid ticket: expected a JSON object, got {}".format(
                type(d).__name__))
    clean = {}
    for name, (kind, required, default) in FIELDS.items():
        if name not in d:
            if required:
                raise errors.BadRequest(
                    "Invalid ticket: missing required field '{}'".format(name))
            if name == "inactivity_timeout":
                default = default_inactivity_timeout
            if default is not None:
                clean[name] = default
            continue
        value = d[name]
        # bool is an int in Python; JSON true is not a size.
        if kind is int and (isinstance(value, bool) or
                            not isinstance(value, int)):
            raise errors.BadRequest(
                "Invalid ticket: field '{}' must be an integer, got {!r}"
                .format(name, value))
        if not isinstance(value, kind):
            raise errors.BadRequest(
                "Invalid ticket: field '{}' must be {}, got {!r}".format(
                    name, _type_name(kind), value))
        if kind is int and not 0 <= value <= LIMITS[name]:
            raise errors.BadRequest(
                "Invalid ticket: field '{}' must be between 0 and {}, "
                "got {}".format(name, LIMITS[name], _short_int(value)))
        clean[name] = value

    if not clean["uuid"]:
        raise errors.BadRequest("Invalid ticket: field 'uuid' is empty")
    if "/" in clean["uuid"] or not clean["uuid"].isprintable():
        raise errors.BadRequest(
            "Invalid ticket: field 'uuid' must not contain '/' or "
            "control characters")
    filename = clean.get("filename")
    if filename is not None and any(
            unicodedata.category(c) == "Cc" for c in filename):
        # The name goes into a Content-Disposition header: CR/LF would
        # inject headers, and no file name needs control characters.
        raise errors.BadRequest(
            "Invalid ticket: field 'filename' must not contain control "
            "characters")
    for op in clean["ops"]:
        if op not in VALID_OPS:
            raise errors.BadRequest(
                "Invalid ticket: field 'ops' has unknown operation {!r}; "
                "expected 'read' or 'write'".format(op))
    if not clean["ops"]:
        raise errors.BadRequest("Invalid ticket: field 'ops' is empty")
    try:
        urls.validate(clean["url"])
    except errors.BadRequest as e:
        raise errors.BadRequest(
            "Invalid ticket: field 'url': {}".format(e.message))
    return clean


def _short_int(value):
    """An integer for an error message: 10**400 is not worth 400 digits."""
    if abs(value) < 10**30:
        return str(value)
    return "{}...({} digits)".format(str(value)[:12], len(str(abs(value))))


def _type_name(kind):
    return {str: "a string", list: "a list", bool: "a boolean",
            int: "an integer"}[kind]


class Ticket:
    """One ticket.  ``authorize`` and ``operation`` are what the images
    service uses; ``info`` is what the control service shows."""

    def __init__(self, d, clock=time.monotonic):
        self._clock = clock
        self.uuid = d["uuid"]
        self.size = d["size"]
        self.url = d["url"]
        self.timeout = d["timeout"]
        self.ops = list(d["ops"])
        self.sparse = d.get("sparse", False)
        self.dirty = d.get("dirty", False)
        self.inactivity_timeout = d.get("inactivity_timeout", 60)
        self.transfer_id = d.get("transfer_id")
        self.filename = d.get("filename")
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._slots = threading.Condition(self._lock)
        self._canceled = False
        self._ops = []
        self._connections = {}
        self._transferred = RangeSet()
        self._meter = RateMeter()
        now = clock()
        self._expires = now + self.timeout
        self._last_done = now

    @property
    def name(self):
        """How logs name this ticket."""
        return self.transfer_id or short_id(self.uuid)

    def may(self, op):
        """Whether the ticket allows ``op`` ("read" or "write")."""
        return op in self.ops or (op == "read" and "write" in self.ops)

    @property
    def canceled(self):
        return self._canceled

    def expired(self):
        with self._lock:
            return self._expired_locked()

    def _expired_locked(self):
        return not self._ops and self._clock() >= self._expires

    def authorize(self, op):
        """Raise Forbidden unless the ticket is live and allows ``op``.

        An operation the ticket does not allow is 403, as the established
        service answers: clients written for it read 405 as "the server
        cannot do this at all"."""
        with self._lock:
            if self._canceled:
                raise errors.Forbidden(
                    "Ticket {} was canceled".format(short_id(self.uuid)))
            if self._expired_locked():
                raise errors.Forbidden(
                    "Ticket {} expired".format(short_id(self.uuid)))
        if op and not self.may(op):
            raise errors.Forbidden(
                "Ticket {} does not allow {}".format(short_id(self.uuid), op))

    def operation(self, offset=0, length=0):
        """Context manager registering a running operation: the ticket is
        active while it runs and extended when it ends."""
        return _Running(self, offset, length)

    def _start(self, op):
        with self._lock:
            self._check_live_locked()
            op.metered_at = self._clock()
            self._ops.append(op)

    def _meter_op(self, op, now):
        # Under the lock: the bytes op moved since it was last metered.
        self._meter.add(op.done - op.metered, op.metered_at, now)
        op.metered = op.done
        op.metered_at = now

    def _finish(self, op, failed=False):
        with self._lock:
            self._ops.remove(op)
            if op.done:
                self._transferred.add(op.offset, op.offset + op.done)
            now = self._clock()
            self._meter_op(op, now)
            if op.done or not failed:
                # Activity extends the ticket; a request refused before it
                # moved a byte (a malformed chunked body) changes nothing.
                self._last_done = now
                self._expires = now + self.timeout
            if not self._ops:
                self._idle.notify_all()

    def check(self):
        """Called between chunks: raise Canceled if the ticket was
        canceled while the operation ran."""
        if self._canceled:
            raise errors.Canceled(
                "Ticket {} was canceled".format(short_id(self.uuid)))

    # Connections

    def add_connection(self, conn_id, closer, limit=None, wait=0.0):
        """Register a client connection; ``closer(force)`` shuts it down
        when the ticket is canceled: an idle one always, a busy one only
        with ``force``.  With ``limit``, wait up to ``wait`` seconds for a
        free slot and return False if none freed.  (A client that closes
        one connection and opens the next races the daemon's clean-up of
        the first: it got its whole answer before the daemon closed.)

        Raise Forbidden if the ticket was canceled: a request that
        authorized just before a DELETE must not open the backend after
        the DELETE returned."""
        with self._lock:
            self._check_live_locked()
            if limit is not None:
                deadline = self._clock() + wait
                while len(self._connections) >= limit:
                    left = deadline - self._clock()
                    if left <= 0:
                        return False
                    self._slots.wait(left)
                    self._check_live_locked()
            self._connections[conn_id] = closer
            return True

    def _check_live_locked(self):
        if self._canceled:
            raise errors.Forbidden(
                "Ticket {} was canceled".format(short_id(self.uuid)))

    def remove_connection(self, conn_id):
        with self._lock:
            self._connections.pop(conn_id, None)
            # All waiters: a cancel waits for no connection, a request for
            # a free slot (and learns of the cancel).
            self._slots.notify_all()
            self._idle.notify_all()

    def connection_count(self):
        with self._lock:
            return len(self._connections)

    # Control

    # What a ticket grants: re-adding the same grant renews the ticket.
    GRANT = ("url", "size", "ops", "sparse", "dirty")

    def same_grant(self, d):
        """Whether the validated ticket ``d`` grants what this one does."""
        mine = {"url": self.url, "size": self.size, "ops": self.ops,
                "sparse": self.sparse, "dirty": self.dirty}
        return all(mine[k] == d.get(k, False if k in ("sparse", "dirty")
                                    else None) for k in self.GRANT)

    def renew(self, d):
        """Take the validated ticket ``d``'s timeouts and names (same
        grant): expiry restarts at now + its timeout."""
        self.inactivity_timeout = d.get("inactivity_timeout",
                                        self.inactivity_timeout)
        self.transfer_id = d.get("transfer_id")
        self.filename = d.get("filename")
        self.extend(d["timeout"])

    def extend(self, timeout):
        """Set expiry to now + ``timeout`` (0 expires at once); a canceled
        ticket stays canceled."""
        with self._lock:
            expires = self._clock() + timeout  # May raise: change nothing.
            self.timeout = timeout
            self._expires = expires

    def cancel(self, timeout):
        """Cancel the ticket and wait up to ``timeout`` seconds for running
        operations to stop.

        Idle connections are shut down at once; running operations stop at
        their next chunk.  Return only once no connection holds the
        ticket's backend (each closes it as it ends).  An operation that does not get there (a client
        that stopped reading, so the daemon is blocked sending to it) has
        its connection shut down after half the timeout (at most
        ``CANCEL_GRACE`` seconds).  Raise Conflict if operations are still
        running at the end.
        """
        with self._lock:
            self._canceled = True
            # Requests waiting for a slot learn of the cancel.
            self._slots.notify_all()
        self._close_connections(force=False)
        deadline = self._clock() + timeout
        grace = self._clock() + min(timeout / 2, CANCEL_GRACE)
        forced = False
        with self._lock:
            while self._ops or self._connections:
                now = self._clock()
                if not forced and now >= grace:
                    forced = True
                    self._lock.release()
                    try:
                        self._close_connections(force=True)
                    finally:
                        self._lock.acquire()
                    continue
                remaining = deadline - now
                if remaining <= 0:
                    raise errors.Conflict(
                        "Timeout cancelling ticket {}: {} operations still "
                        "running, {} connections open; try again".format(
                            short_id(self.uuid), len(self._ops),
                            len(self._connections)))
                wait = remaining if forced else grace - now
                self._idle.wait(max(0.01, min(wait, 0.5)))
                if not self._ops and self._connections and not forced:
                    # A connection that was busy at the first pass may
                    # have gone idle since, still holding the backend.
                    self._lock.release()
                    try:
                        self._close_connections(force=False)
                    finally:
                        self._lock.acquire()

    def _close_connections(self, force):
        with self._lock:
            closers = list(self._connections.values())
        for close in closers:
            try:
                close(force)
            except OSError:
                pass

    def info(self):
        with self._lock:
            now = self._clock()
            active = bool(self._ops)
            d = {
                "uuid": self.uuid,
                "size": self.size,
                "url": self.url,
                "timeout": self.timeout,
                "ops": list(self.ops),
                "sparse": self.sparse,
                "dirty": self.dirty,
                "inactivity_timeout": self.inactivity_timeout,
                "active": active,
                "canceled": self._canceled,
                "connections": len(self._connections),
                "expires": int(self._expires),
                "idle_time": 0 if active else int(now - self._last_done),
                "rate": self._rate_locked(now),
            }
            if self.transfer_id is not None:
                d["transfer_id"] = self.transfer_id
            if self.filename is not None:
                d["filename"] = self.filename
            # Only meaningful when data moves one way.
            if len(self.ops) == 1:
                running = [(op.offset, op.offset + op.done)
                           for op in self._ops if op.done]
                d["transferred"] = self._transferred.total(running)
            return d

    def _rate_locked(self, now):
        for op in self._ops:
            self._meter_op(op, now)
        return int(self._meter.rate(now))


class _Running:

    def __init__(self, ticket, offset, length):
        self._ticket = ticket
        self.op = Operation(offset, length)

    def __enter__(self):
        self._ticket._start(self.op)
        return self

    def progress(self, n):
        """Account ``n`` more bytes; raise Canceled if the ticket was
        canceled meanwhile."""
        self.op.done += n
        self._ticket.check()

    def __exit__(self, exc_type, exc, tb):
        self._ticket._finish(self.op, failed=exc_type is not None)


class Store:
    """The daemon's tickets by id."""

    def __init__(self, cfg):
        self._cfg = cfg
        self._lock = threading.Lock()
        # Adds of one id take turns (replacing waits for the old one).
        self._adding = threading.Lock()
        self._tickets = {}

    def add(self, d):
        """Add the ticket ``d``.  When its id exists: the same image with
        the same rights renews the existing ticket (its connections go
        on); anything else cancels the old ticket first, closing its
        connections, so none keeps writing under an id that now means
        another ticket (Conflict if they do not stop in time)."""
        clean = validate(d, self._cfg.daemon.inactivity_timeout)
        with self._adding:
            with self._lock:
                old = self._tickets.get(clean["uuid"])
            if old is not None and not old.canceled \
                    and old.same_grant(clean):
                old.renew(clean)
                log.info("Renewed ticket %s (timeout=%d)", old.name,
                         old.timeout)
                return old
            if old is not None:
                log.info("Replacing ticket %s: canceling the old one",
                         old.name)
                old.cancel(self._cfg.control.remove_timeout)
            ticket = Ticket(clean)
            with self._lock:
                self._tickets[ticket.uuid] = ticket
        log.info("Added ticket %s (size=%d, ops=%s, timeout=%d)",
                 ticket.name, ticket.size, ticket.ops, ticket.timeout)
        return ticket

    def get(self, ticket_id):
        """Return the ticket or raise NotFound."""
        with self._lock:
            try:
                return self._tickets[ticket_id]
            except KeyError:
                raise errors.NotFound(
                    "No such ticket {}".format(short_id(ticket_id)))

    def authorize(self, ticket_id, op):
        """Return the ticket if it allows ``op`` now; else raise Forbidden
        (unknown, expired, canceled, or ``op`` not allowed)."""
        with self._lock:
            ticket = self._tickets.get(ticket_id)
        if ticket is None:
            raise errors.Forbidden(
                "No such ticket {}".format(short_id(ticket_id)))
        ticket.authorize(op)
        return ticket

    def ids(self):
        with self._lock:
            return sorted(self._tickets)

    def count(self):
        with self._lock:
            return len(self._tickets)

    def modify(self, ticket_id, changes):
        if not isinstance(changes, dict):
            raise errors.BadRequest("Invalid patch: expected a JSON object")
        if "timeout" not in changes:
            raise errors.BadRequest("Invalid patch: missing field 'timeout'")
        timeout = changes["timeout"]
        if isinstance(timeout, bool) or not isinstance(timeout, int):
            raise errors.BadRequest(
                "Invalid patch: field 'timeout' must be an integer, "
                "got {!r}".format(timeout))
        if not 0 <= timeout <= MAX_TIMEOUT:
            raise errors.BadRequest(
                "Invalid patch: field 'timeout' must be between 0 and {}, "
                "got {}".format(MAX_TIMEOUT, _short_int(timeout)))
        ticket = self.get(ticket_id)
        ticket.extend(timeout)
        log.info("Extended ticket %s timeout=%d", ticket.name, timeout)
        return ticket

    def remove(self, ticket_id, timeout):
        """Cancel and remove; unknown ids succeed (idempotent).  Raise
        Conflict if running operations did not stop within ``timeout``."""
        with self._lock:
            ticket = self._tickets.get(ticket_id)
        if ticket is None:
            return
        ticket.cancel(timeout)
        with self._lock:
            if self._tickets.get(ticket_id) is ticket:
                del self._tickets[ticket_id]
        log.info("Removed ticket %s", ticket.name)

    def remove_all(self, timeout):
        for ticket_id in self.ids():
            self.remove(ticket_id, timeout)
