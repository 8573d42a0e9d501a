"""One NBD connection on the connections machinery: the fixed newstyle
handshake (STARTTLS, GO/INFO/EXPORT_NAME with the ticket id as the export
name, structured replies, meta contexts) and the transmission phase, each
command checked against the ticket and served through the backend's
primitives (every backend serves NBD with no code of its own).

As an HTTP connection does, an NBD connection waits in the selector
(imageio.connections) while nothing is buffered: the reader returns one
unit at a time (the client's flags, an option, a request header) once it
has all of it, and a worker serves it.  A write's payload is read by the
worker straight into the transfer buffer.
"""

import contextlib
import errno
import logging
import socket
import threading
import time

from .. import buffers
from .. import checksum
from .. import errors
from .. import metrics
from .. import ops
from .. import redact
from .. import served
from .. import streams
from .._io import stream
from .._io.buffer import AlignedBuffer
from ..handlers import access
from . import pipeline
from . import protocol as p

log = logging.getLogger("nbd")

# Block size constraints advertised (NBD_INFO_BLOCK_SIZE); the maximum is
# also the largest request served.
MIN_BLOCK = 1
PREFERRED_BLOCK = 4096
MAX_BLOCK = 32 * 1024**2

# Context ids of the meta contexts a client may select.
ALLOCATION_ID = 1
DIRTY_ID = 2

# Phases.
FLAGS = "flags"
OPTIONS = "options"
TRANSMISSION = "transmission"


class Reader(streams.Reader):
    """A connection's reader returning whole NBD units: ("flags", data),
    ("option", option, data) or ("request", header tuple)."""

    def __init__(self, sock):
        super().__init__(sock)
        self.phase = FLAGS

    def parse_head(self):
        avail = len(self._buf) - self._pos
        start = self._pos
        if self.phase == FLAGS:
            if avail < 4:
                return None
            self._pos += 4
            unit = ("flags", bytes(self._buf[start:start + 4]))
        elif self.phase == OPTIONS:
            if avail < 16:
                return None
            option, length = p.parse_option_header(
                bytes(self._buf[start:start + 16]))
            if avail < 16 + length:
                return None
            self._pos += 16 + length
            unit = ("option", option,
                    bytes(self._buf[start + 16:start + 16 + length]))
        else:
            if avail < 28:
                return None
            self._pos += 28
            unit = ("request",) + p.parse_request(
                bytes(self._buf[start:start + 28]))
        self._compact()
        return unit



class Connection(served.Served):
    """One NBD client connection (imageio.connections drives it like an
    HTTP one: ``reader``, ``serve_one``, ``next_head``, ``idle``, ``close``).
    """

    def __init__(self, sock, store, cfg, name, service, tls_context=None):
        super().__init__(sock, Reader, cfg.daemon.inactivity_timeout, name,
                         service)
        self.store = store
        self.cfg = cfg
        self.error_headers = {}
        # TLS required before anything else (TCP), given by STARTTLS.
        self._tls_context = tls_context
        self._no_zeroes = False
        self._structured = False
        self._contexts = {}
        self._ticket_id = None
        self._ticket = None
        self._backend = None
        self._status = 200
        # Every reply goes out under this lock (the pipeline's when there
        # is one): lanes reply while the worker reads on.
        self._send_lock = threading.Lock()
        self._pipeline = None
        self.sock.sendall(p.greeting())

    def serve_error(self, e):
        """A malformed unit (ProtocolError): nothing to answer."""
        log.info("%s: %s", self.name, e)

    def log_failure(self, e):
        if isinstance(e, p.ProtocolError):
            log.info("%s: closing: %s", self.name, e)
        else:
            super().log_failure(e)

    def serve_one(self, unit):
        """Serve one unit; True if the connection goes on."""
        self.busy = True
        try:
            kind = unit[0]
            if kind == "flags":
                self._no_zeroes = p.parse_client_flags(unit[1])
                self.reader.phase = OPTIONS
                return True
            if kind == "option":
                return self._option(unit[1], unit[2])
            return self._request(*unit[1:])
        except p.ProtocolError as e:
            log.info("%s: closing: %s", self.name, e)
            return False
        finally:
            self.busy = False

    # Handshake.

    def _send(self, data):
        self._send_parts((data,))

    def _send_parts(self, parts):
        with self._send_lock:
            self._send_locked(parts)

    def _send_locked(self, parts):
        # The caller holds the send lock.  A plain socket is written with
        # writev, polling when full, whatever its timeout mode (a lane
        # sends while the worker reads with its own timeout).
        if self.sock.fd != -1:
            pipeline.send_parts(self.sock.fd, parts, self.timeout)
        else:
            self.sock.send_parts(parts)

    # The connection's life: lanes end when it goes idle or closes.

    def next_head(self, linger):
        head = super().next_head(linger)
        # While lanes still serve, the client waits for their replies and
        # sends more after them: keep reading.
        while head is None and self._pipeline is not None \
                and self._pipeline.busy and not self.closing:
            head = super().next_head(linger)
        return head

    def idle(self):
        if self._pipeline is not None:
            self._pipeline.close()
        super().idle()

    def close(self):
        if self._pipeline is not None:
            self._pipeline.close()
        super().close()

    def _option(self, option, data):
        if self._tls_context is not None and not self.sock.is_tls:
            if option == p.OPT_STARTTLS:
                if data:
                    self._send(p.option_error(option, p.REP_ERR_INVALID,
                                              "STARTTLS takes no data"))
                    return True
                self._send(p.option_reply(option, p.REP_ACK))
                self.sock.setblocking(False)
                self.sock.start_tls(self._tls_context)
                self.tls_pending = True
                return True
            if option == p.OPT_ABORT:
                self._send(p.option_reply(option, p.REP_ACK))
                return False
            if option == p.OPT_EXPORT_NAME:
                return False  # No way to answer an error.
            self._send(p.option_error(option, p.REP_ERR_TLS_REQD,
                                      "TLS is required: send STARTTLS"))
            return True
        if option == p.OPT_STARTTLS:
            self._send(p.option_error(
                option, p.REP_ERR_INVALID if self.sock.is_tls
                else p.REP_ERR_POLICY, "TLS is not available here"
                if not self.sock.is_tls else "TLS is already on"))
            return True
        if option == p.OPT_ABORT:
            self._send(p.option_reply(option, p.REP_ACK))
            return False
        if option == p.OPT_LIST:
            # Export names are ticket ids, secrets: none is listed.
            self._send(p.option_reply(option, p.REP_ACK))
            return True
        if option == p.OPT_STRUCTURED_REPLY:
            self._structured = True
            self._send(p.option_reply(option, p.REP_ACK))
            return True
        if option in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
            return self._meta_context(option, data)
        if option in (p.OPT_INFO, p.OPT_GO):
            return self._go(option, data)
        if option == p.OPT_EXPORT_NAME:
            return self._export_name(data)
        self._send(p.option_error(option, p.REP_ERR_UNSUP,
                                  "Unsupported option {}".format(option)))
        return True

    def _lookup(self, name):
        """(ticket, backend) of export ``name`` (a ticket id), bound to this
        connection; errors.Error when it cannot be served."""
        ticket, backend, _ = access.open_image(
            self, name, "read", self.store, self.cfg, buffer=False)
        return ticket, backend

    def _flags(self, ticket, backend):
        flags = (p.TF_HAS_FLAGS | p.TF_SEND_FLUSH | p.TF_SEND_FUA |
                 p.TF_SEND_WRITE_ZEROES | p.TF_SEND_CACHE | p.TF_SEND_DF |
                 p.TF_SEND_FAST_ZERO)
        if ticket.sparse:
            flags |= p.TF_SEND_TRIM
        if not ticket.may("write"):
            flags |= p.TF_READ_ONLY
        if backend.max_writers > 1 or not ticket.may("write"):
            flags |= p.TF_CAN_MULTI_CONN
        return flags

    def _export_option(self, option, parse, data):
        """(name, rest, ticket, backend) of an option naming an export, or
        None once an error reply went out."""
        try:
            name, rest = parse(data)
        except (ValueError, UnicodeDecodeError) as e:
            self._send(p.option_error(option, p.REP_ERR_INVALID, str(e)))
            return None
        try:
            ticket, backend = self._lookup(name)
        except errors.Error as e:
            log.info("%s: export %s refused: %s", self.name,
                     redact.short_id(name), e.message)
            self._send(p.option_error(option, p.REP_ERR_UNKNOWN, e.message))
            return None
        return name, rest, ticket, backend

    def _go(self, option, data):
        found = self._export_option(option, p.parse_info_request, data)
        if found is None:
            return True
        name, _, ticket, backend = found
        size = ticket.size
        self._send(p.option_reply(option, p.REP_INFO, p.info_export(
            size, self._flags(ticket, backend))))
        self._send(p.option_reply(option, p.REP_INFO, p.info_block_size(
            MIN_BLOCK, PREFERRED_BLOCK, MAX_BLOCK)))
        self._send(p.option_reply(option, p.REP_ACK))
        if option == p.OPT_GO:
            self._enter(name, ticket, backend)
        return True

    def _export_name(self, data):
        try:
            name = data.decode("utf-8")
            ticket, backend = self._lookup(name)
        except (UnicodeDecodeError, errors.Error) as e:
            log.info("%s: export refused: %s", self.name, e)
            return False  # NBD_OPT_EXPORT_NAME has no error reply.
        self._send(p.export_name_reply(ticket.size,
                                       self._flags(ticket, backend),
                                       self._no_zeroes))
        self._enter(name, ticket, backend)
        return True

    def _enter(self, name, ticket, backend):
        self._ticket_id = name
        self._ticket = ticket
        self._backend = backend
        self.reader.phase = TRANSMISSION
        # Lanes where storage I/O waits (O_DIRECT on a disk: ``overlap``);
        # on memory-backed files a request costs less served in place
        # (measured: bench/nbdserve.py, docs/benchmarks.md).
        if self.sock.fd != -1 and backend.shared_clones and backend.overlap:
            self._pipeline = pipeline.Pipeline(
                self._open_lane, self._close_lane, self._lane_failed)
        log.info("%s: serving ticket %s over NBD", self.name, ticket.name)

    def _meta_context(self, option, data):
        if option == p.OPT_SET_META_CONTEXT and not self._structured:
            self._send(p.option_error(option, p.REP_ERR_INVALID,
                                      "structured replies first"))
            return True
        found = self._export_option(option, p.parse_meta_context_request,
                                    data)
        if found is None:
            return True
        _, queries, ticket, backend = found
        dirty = self._dirty_context(ticket, backend)
        available = {p.BASE_ALLOCATION: ALLOCATION_ID}
        if dirty:
            available[dirty] = DIRTY_ID
        chosen = {}
        for query in queries or (list(available) if option ==
                                 p.OPT_LIST_META_CONTEXT else []):
            for ctx, cid in available.items():
                if ctx == query or (query.endswith(":") and
                                    ctx.startswith(query)) or \
                        (query == "qemu:dirty-bitmap:" and ctx == dirty):
                    chosen[ctx] = cid
        for ctx, cid in chosen.items():
            self._send(p.meta_context_reply(option, cid, ctx))
        if option == p.OPT_SET_META_CONTEXT:
            self._contexts = {cid: ctx for ctx, cid in chosen.items()}
        self._send(p.option_reply(option, p.REP_ACK))
        return True

    def _dirty_context(self, ticket, backend):
        """The dirty bitmap context of a dirty ticket over an NBD export
        that has one, else None."""
        if not ticket.dirty:
            return None
        return backend.dirty_context

    # Transmission.

    def _error_reply(self, cookie, error, message=""):
        if self._structured:
            return p.error_chunk(cookie, error, message)
        return p.simple_reply(cookie, error)

    def _reply_error(self, cookie, error, message=""):
        self._status = _STATUS.get(error, 500)
        self._send(self._error_reply(cookie, error, message))

    def _request(self, flags, kind, cookie, offset, length):
        if kind == p.CMD_DISC:
            return False
        self._started = time.monotonic()
        self._status = 200
        try:
            return self._serve_request(flags, kind, cookie, offset, length)
        finally:
            # None: a lane serves it and counts it when it replies.
            if self._status is not None:
                metrics.request_done(self.service, _NAMES.get(kind, "other"),
                                     self._status,
                                     time.monotonic() - self._started)

    def _serve_request(self, flags, kind, cookie, offset, length):
        if kind not in p.CMD_FLAGS or flags & ~p.CMD_FLAGS[kind]:
            if kind == p.CMD_WRITE:
                return False  # Its payload cannot be skipped safely.
            self._reply_error(cookie, p.EINVAL, "unknown command or flag")
            return True
        op = _OP[kind]
        size = self._ticket.size
        if kind == p.CMD_WRITE and length > MAX_BLOCK:
            self._reply_error(cookie, p.EINVAL, "request over the maximum")
            return False  # Cannot skip a payload that large.
        if kind != p.CMD_FLUSH and (offset + length > size):
            error = p.ENOSPC if op == "write" else p.EINVAL
            if kind == p.CMD_WRITE:
                self._skip(length)
            self._reply_error(cookie, error, "range past the end")
            return True
        if kind in (p.CMD_READ,) and length > MAX_BLOCK:
            self._reply_error(cookie, p.EINVAL, "request over the maximum")
            return True
        if not self._ticket.may(op):
            if kind == p.CMD_WRITE:
                self._skip(length)
            self._reply_error(cookie, p.EPERM, "the ticket does not allow "
                              "{}".format(op))
            return True
        pipe = self._pipeline
        if pipe is not None:
            if kind in _PIPELINED and length >= LANE_MIN:
                lane = pipe.acquire()
                if lane is not None:
                    if kind != p.CMD_WRITE or length <= len(lane.buf):
                        return self._hand_off(lane, flags, kind, cookie,
                                              offset, length)
                    pipe.release(lane)
            if kind not in _INLINE:
                # FLUSH covers every write before it, BLOCK_STATUS sees
                # them, a write too large for a lane follows the others.
                pipe.drain()
        try:
            ticket, backend, buf = access.open_image(
                self, self._ticket_id, op, self.store, self.cfg)
        except errors.Error as e:
            if kind == p.CMD_WRITE:
                self._skip(length)
            self._reply_error(cookie, p.ESHUTDOWN, e.message)
            return False
        try:
            return self._command(kind, flags, cookie, offset, length,
                                 ticket, backend, buf)
        except Exception as e:
            error, message, keep = self._failure(kind, offset, length, e)
            self._reply_error(cookie, error, message)
            return keep

    def _failure(self, kind, offset, length, e):
        """(NBD error, message, whether the connection goes on) for a
        command that failed with ``e``; the client's own failures (it went
        away, it stalled) are raised again: nothing can be answered."""
        if isinstance(e, errors.Canceled):
            return p.ESHUTDOWN, e.message, False
        if isinstance(e, (ConnectionError, socket.timeout)) or \
                not isinstance(e, (errors.Error, OSError)):
            raise e
        log.warning("%s: NBD command %d at %d length %d failed: %s",
                    self.name, kind, offset, length, e)
        error = p.ENOSPC if isinstance(e, OSError) and \
            e.errno == errno.ENOSPC else p.EIO
        return (error, "{} failed".format(_OP[kind]),
                not isinstance(e, errors.PartialContent))

    # Pipelined requests (imageio.nbd.pipeline).

    def _open_lane(self):
        """A clone of the ticket's backend and a buffer for a lane, or
        None (no buffer free in time: the request is served in place)."""
        pool = buffers.pool(self.cfg)
        try:
            buf = pool.get(_lane_size(self.cfg))
        except errors.ServiceUnavailable:
            return None
        try:
            return self._backend.clone(), buf
        except BaseException:
            pool.release(buf)
            raise

    def _close_lane(self, backend, buf):
        try:
            backend.close()
        finally:
            buffers.pool(self.cfg).release(buf)

    def _lane_failed(self, e):
        """A lane's request ended the connection."""
        if not isinstance(e, OSError):
            log.error("%s: NBD request failed", self.name, exc_info=e)
        self.shutdown()

    def _hand_off(self, lane, flags, kind, cookie, offset, length):
        """Give a request to ``lane``; a write's payload is read here
        first, so the next request can be read while the lane writes."""
        pipe = self._pipeline
        try:
            ticket, backend, _ = access.open_image(
                self, self._ticket_id, _OP[kind], self.store,
                self.cfg, buffer=False)
        except errors.Error as e:
            pipe.release(lane)
            if kind == p.CMD_WRITE:
                self._skip(length)
            self._reply_error(cookie, p.ESHUTDOWN, e.message)
            return False
        start = 0
        if kind == p.CMD_WRITE:
            # O_DIRECT: the payload lands as aligned in the buffer as in
            # the file, so only a partial head or tail needs a bounce.
            skip = offset % _ALIGN
            if skip + length <= len(lane.buf):
                start = skip
            try:
                self._receive(lane.buf, start, length)
            except BaseException:
                pipe.release(lane)
                raise
        self._status = None
        pipe.submit(lane, self._lane_serve, flags, kind, cookie, offset,
                    length, start, ticket, backend, self._started)
        return True

    def _lane_serve(self, lane, flags, kind, cookie, offset, length, start,
                    ticket, metered, started):
        status = 200
        try:
            if kind == p.CMD_READ:
                with ticket.operation(offset, length) as run:
                    with metered.operation("read", length):
                        self._read(cookie, offset, length, lane.backend,
                                   lane.buf, run)
            else:
                self._modify(kind, flags, offset, length, ticket, metered,
                             memoryview(lane.buf)[start:start + length],
                             lane.backend)
                self._send(p.simple_reply(cookie))
        except Exception as e:
            error, message, keep = self._failure(kind, offset, length, e)
            status = _STATUS.get(error, 500)
            self._send(self._error_reply(cookie, error, message))
            if not keep:
                self.shutdown()
        finally:
            metrics.request_done(self.service, _NAMES.get(kind, "other"),
                                 status, time.monotonic() - started)

    def _receive(self, buf, start, length):
        """A write's whole payload into ``buf[start:start + length]``:
        what the reader buffered, then the rest in C straight from the
        socket."""
        body = streams.Body(self.reader, self.sock, length, self.timeout)
        view = memoryview(buf)
        got = 0
        while got < length:
            fd = body.fd
            if fd != -1 and isinstance(buf, AlignedBuffer):
                n = stream.recv_into(fd, buf, start + got, length - got,
                                     self.timeout)
                body.consumed(n)
            else:
                n = body.readinto(view[start + got:start + length])
            if not n:
                raise ConnectionResetError(
                    "Client closed in a write payload ({} of {} "
                    "bytes)".format(got, length))
            got += n

    @contextlib.contextmanager
    def _payload(self, length, buf):
        """A write's whole payload, in the transfer buffer (or, for a
        request larger than it, in memory counted against
        max_buffer_memory)."""
        reserved = 0
        if length > len(buf):
            reserved = length
            pool = buffers.pool(self.cfg)
            pool.reserve(reserved)
            buf = bytearray(length)
        try:
            self._receive(buf, 0, length)
            yield memoryview(buf)[:length]
        finally:
            if reserved:
                pool.unreserve(reserved)

    def _skip(self, length):
        body = streams.Body(self.reader, self.sock, length, self.timeout)
        scratch = memoryview(bytearray(min(length, 65536) or 1))
        while body.remaining:
            if not body.readinto(scratch):
                raise ConnectionResetError("Client closed in a payload")

    def _command(self, kind, flags, cookie, offset, length, ticket,
                 backend, buf):
        if kind == p.CMD_READ:
            with ticket.operation(offset, length) as run:
                with backend.operation("read", length) as b:
                    self._read(cookie, offset, length, b, buf, run)
            return True
        if kind == p.CMD_WRITE:
            # The whole payload first: a client that disconnects in the
            # middle of it changes nothing.
            with self._payload(length, buf) as data:
                self._modify(kind, flags, offset, length, ticket, backend,
                             data)
        elif kind == p.CMD_FLUSH:
            with ticket.operation():
                backend.flush()
        elif kind in (p.CMD_WRITE_ZEROES, p.CMD_TRIM):
            if not self._modify(kind, flags, offset, length, ticket, backend,
                                None):
                self._reply_error(cookie, p.ENOTSUP, "no fast zero")
                return True
        elif kind == p.CMD_CACHE:
            pass
        elif kind == p.CMD_BLOCK_STATUS:
            return self._block_status(flags, cookie, offset, length,
                                      ticket, backend)
        self._send(p.simple_reply(cookie))
        return True

    def _modify(self, kind, flags, offset, length, ticket, metered, data,
                lane_backend=None):
        """WRITE ``data``, WRITE_ZEROES or TRIM, counted by ``metered``
        (the connection's backend), with a lane's clone of it if given;
        False when FAST_ZERO cannot be honoured."""
        if kind == p.CMD_TRIM and not ticket.sparse:
            return True  # Advisory: nothing to do on a preallocated image.
        if flags & p.CMD_FLAG_FAST_ZERO and "zero" not in metered.features:
            return False
        with ticket.operation(offset, length) as run:
            if kind == p.CMD_WRITE:
                with metered.operation("write", length) as backend:
                    if length:
                        (lane_backend or backend).write(data, offset)
            else:
                punch = ticket.sparse and (kind == p.CMD_TRIM or
                                           not flags & p.CMD_FLAG_NO_HOLE)
                if lane_backend is None:
                    ops.zero(metered, offset, length, punch, run.progress)
                else:
                    with metered.operation("zero", length):
                        ops.zero(lane_backend, offset, length, punch,
                                 run.progress)
            if kind == p.CMD_WRITE:
                run.progress(length)
            if flags & p.CMD_FLAG_FUA:
                with metered.operation("flush", 0) as backend:
                    (lane_backend or backend).flush()
        return True

    def _read(self, cookie, offset, length, backend, buf, run):
        """Reply to a READ: a hole chunk where the backend knows the range
        starts with zeroes, data chunks for the rest (a simple reply: the
        header then every byte, under the send lock all along); the file
        backend's sendfile on a plain socket."""
        fd = self.sock.fd
        send_to = backend.send_to if fd != -1 else None
        end = offset + length
        if not self._structured:
            with self._send_lock:
                self._send_locked((p.simple_reply(cookie),))
                self._read_data(cookie, offset, end, backend, buf, run,
                                send_to, False)
            return
        if length == 0:
            self._send(p.structured_reply(cookie, p.REPLY_TYPE_NONE))
            return
        pos = offset
        while pos < end:
            hole = backend.leading_hole(pos, end - pos)
            if hole:
                self._send(p.hole_chunk(cookie, pos, hole, pos + hole == end))
                run.progress(hole)
                pos += hole
            else:
                # Holes further on read as zeroes: asking where the data
                # ends costs more than it saves.
                self._read_data(cookie, pos, end, backend, buf, run,
                                send_to, True)
                break

    def _read_data(self, cookie, pos, end, backend, buf, run, send_to,
                   chunks):
        # Room O_DIRECT needs around an unaligned read (as checksum's).
        step = len(buf) - checksum.READ_SLACK
        while pos < end:
            n = min(step, end - pos)
            head = (p.data_chunk_header(cookie, pos, n, pos + n == end),) \
                if chunks else ()
            if send_to is not None:
                lock = self._send_lock if chunks else contextlib.nullcontext()
                with lock:
                    self._send_locked(head)
                    send_to(self.sock.fd, pos, n, buf, self.timeout,
                            run.progress)
            else:
                view = backend.readinto(buf, pos, n)
                if chunks:
                    with self._send_lock:
                        self._send_locked(head + (view,))
                else:
                    self._send_locked((view,))
                run.progress(n)
            pos += n

    def _block_status(self, flags, cookie, offset, length, ticket, backend):
        if not self._structured or not self._contexts:
            self._reply_error(cookie, p.EINVAL, "no meta context selected")
            return True
        end = min(offset + length, ticket.size)
        items = sorted(self._contexts.items())
        with ticket.operation():
            for i, (cid, ctx) in enumerate(items):
                if cid == ALLOCATION_ID:
                    # A range that reads as zero is reported as a hole
                    # that reads as zero: clients skip it either way.
                    found = [(e.length, (p.STATE_HOLE | p.STATE_ZERO)
                              if e.zero else 0)
                             for e in backend.extents(offset, end - offset,
                                                      "zero")]
                else:
                    found = [(e.length, p.STATE_DIRTY if e.dirty else 0)
                             for e in backend.extents(offset, end - offset,
                                                      "dirty")]
                if flags & p.CMD_FLAG_REQ_ONE:
                    found = found[:1]
                self._send(p.block_status_chunk(
                    cookie, cid, _u32(found), done=i == len(items) - 1))
        return True


# Commands and errors as /metrics counts them (the HTTP names: a command
# is a method, an error its nearest status).
_NAMES = {p.CMD_READ: "READ", p.CMD_WRITE: "WRITE", p.CMD_FLUSH: "FLUSH",
          p.CMD_TRIM: "TRIM", p.CMD_CACHE: "CACHE",
          p.CMD_WRITE_ZEROES: "WRITE_ZEROES",
          p.CMD_BLOCK_STATUS: "BLOCK_STATUS"}
_OP = {p.CMD_READ: "read", p.CMD_WRITE: "write", p.CMD_FLUSH: "read",
       p.CMD_TRIM: "write", p.CMD_CACHE: "read", p.CMD_WRITE_ZEROES: "write",
       p.CMD_BLOCK_STATUS: "read"}
# Writes of LANE_MIN bytes or more are served by a connection's lanes
# (imageio.nbd.pipeline) on storage with I/O wait: their payload's receive
# overlaps the previous write.  Measured with nbdcopy, 1 GiB qcow2 half
# data, into an O_DIRECT file on the ext4 disk (docs/benchmarks.md): 0.69-
# 0.72 s with lanes, 0.76-0.83 s without, for 0.25 CPU-s/GiB more.  Reads
# are faster in place (sendfile; the kernel reads ahead): 0.40-0.50 s
# against 0.52-0.58 s through lanes.  A small request costs less served in
# place than handed to a thread (4 KiB writes, 64 in flight: 24 us of
# daemon CPU a request in place, ~90 us through the lanes).  WRITE_ZEROES,
# TRIM, READ and CACHE are served in place while lanes write; the other
# commands wait until the lanes are done.
LANE_MIN = 64 * 1024
_PIPELINED = frozenset({p.CMD_WRITE})
_INLINE = frozenset({p.CMD_READ, p.CMD_WRITE, p.CMD_WRITE_ZEROES,
                     p.CMD_TRIM, p.CMD_CACHE})
# O_DIRECT alignment a write's payload keeps in a lane's buffer.
_ALIGN = 4096
_STATUS = {p.EPERM: 403, p.ESHUTDOWN: 403, p.EINVAL: 400, p.ENOSPC: 507,
           p.ENOTSUP: 400, p.EIO: 500}


def _lane_size(cfg):
    return max(cfg.backend_file.buffer_size, cfg.backend_nbd.buffer_size,
               cfg.backend_http.buffer_size)


def _u32(descriptors):
    """Descriptors whose lengths fit 32 bits (split longer ones)."""
    out = []
    limit = 2**32 - 4096
    for length, flags in descriptors:
        while length > limit:
            out.append((limit, flags))
            length -= limit
        if length:
            out.append((length, flags))
    return out

