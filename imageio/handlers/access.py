"""The one path from a request to an image: authorize the ticket, bind the
connection to it, open (or reuse) the connection's backend and buffer.

Every images handler calls ``open_image``; errors raised here and by the
operations become responses in ``imageio.http``.
"""

import logging

from .. import backends
from .. import buffers
from .. import errors
from .. import metrics
from .. import urls

log = logging.getLogger("access")

CORS = {"Access-Control-Allow-Origin": "*"}


class Binding:
    """A connection's use of one ticket: its backend, opened once and
    reused across the connection's requests."""

    def __init__(self, ticket, backend):
        self.ticket = ticket
        self.backend = backend


# How long a request waits for a connection slot of its ticket before 503:
# covers a client's previous connection that the daemon is still closing.
SLOT_WAIT = 2.0


def open_image(conn, ticket_id, op, store, cfg, buffer=True):
    """Return (ticket, backend, buffer) for ``op`` on ``ticket_id``; no
    buffer (None) with ``buffer=False`` or for OPTIONS (``op`` None).

    Raises Forbidden (no valid ticket, or ``op`` not allowed),
    ServiceUnavailable (too many connections), BackendError (image
    unreachable).
    """
    conn.error_headers = CORS
    ticket = store.authorize(ticket_id, op)
    bindings = conn.context.setdefault("bindings", {})
    binding = bindings.get(ticket_id)
    if binding is not None and binding.ticket is not ticket:
        # The ticket was replaced; drop the old backend.
        _unbind(conn, binding)
        binding = None
    if binding is None:
        binding = _bind(conn, ticket, cfg)
        bindings[ticket_id] = binding
    # OPTIONS (op None) moves no image bytes: no buffer.
    return (ticket, binding.backend,
            _buffer(conn, cfg) if op and buffer else None)


def _bind(conn, ticket, cfg):
    limit = cfg.daemon.max_connections
    if not ticket.add_connection(id(conn), lambda force: _close(conn, force),
                                 limit=limit, wait=SLOT_WAIT):
        raise errors.ServiceUnavailable(
            "Too many connections for ticket {}: at most {} allowed"
            .format(ticket.name, limit))
    try:
        backend = backends.open_backend(ticket, cfg)
    except OSError as e:
        ticket.remove_connection(id(conn))
        raise errors.BackendError(
            "Cannot open image for ticket {}: {}".format(
                ticket.name, e.strerror or e))
    except BaseException:
        # The slot is free again, whatever stopped the open.
        ticket.remove_connection(id(conn))
        raise
    backend = metrics.Metered(backend, urls.scheme_of(ticket.url),
                              conn.name, ticket.name)
    binding = Binding(ticket, backend)
    conn.bound = True
    conn.on_close(lambda: _unbind(conn, binding))
    conn.set_timeout(ticket.inactivity_timeout or None)
    log.debug("%s: bound to ticket %s", conn.name, ticket.name)
    return binding


def _unbind(conn, binding):
    bindings = conn.context.get("bindings", {})
    if bindings.get(binding.ticket.uuid) is binding:
        del bindings[binding.ticket.uuid]
    # Close the backend before the ticket forgets the connection: a
    # DELETE answers once no connection is left, and the LV teardown that
    # follows it must never meet an open fd.
    try:
        binding.backend.close()
    finally:
        binding.ticket.remove_connection(id(conn))


def _close(conn, force):
    # A busy connection stops at its next chunk (Ticket.check) and answers
    # the client; an idle one is closed now so it does not hold the
    # ticket's backend open.  A busy one that does not reach its next
    # chunk in time is closed too (force).
    if force or not conn.busy:
        conn.shutdown()


def _buffer(conn, cfg):
    """The connection's transfer buffer: taken from the daemon's bounded
    pool on first use (ServiceUnavailable when none frees up in time) and
    given back when the connection goes idle, so idle connections hold no
    buffer memory."""
    buf = conn.context.get("buffer")
    if buf is None:
        pool = buffers.pool(cfg)
        size = max(cfg.backend_file.buffer_size, cfg.backend_nbd.buffer_size,
                   cfg.backend_http.buffer_size)
        buf = pool.get(size)
        conn.context["buffer"] = buf

        def release():
            if conn.context.get("buffer") is buf:
                del conn.context["buffer"]
            pool.release(buf)

        conn.on_idle(release)
    return buf


class Resource:
    """A handler over the ticket store and the daemon configuration."""

    def __init__(self, store, cfg):
        self.store = store
        self.cfg = cfg


def query_int(query, name, default):
    """The query parameter ``name`` as an integer >= 0, or ``default`` when
    absent; BadRequest naming the parameter otherwise."""
    raw = query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or len(raw) > 20:
        raise errors.BadRequest(
            "Invalid {} {!r}: expected an integer >= 0".format(name, raw))
    return int(raw)
