"""/images/{ticket}/extents and /images/{ticket}/checksum."""

from .. import checksum
from .. import errors
from .access import CORS, open_image


class Extents:

    def __init__(self, store, cfg):
        self.store = store
        self.cfg = cfg

    def get(self, req, resp, ticket_id):
        ticket, backend, _ = open_image(req, ticket_id, "read", self.store,
                                        self.cfg)
        context = req.query.get("context", "zero")
        if context not in ("zero", "dirty"):
            raise errors.BadRequest(
                "Invalid context {!r}: expected 'zero' or 'dirty'".format(
                    context))
        if context == "dirty" and not ticket.dirty:
            raise errors.NotFound(
                "Dirty extents are not available: the ticket was not "
                "created with dirty=true")
        if "extents" not in backend.features:
            raise errors.NotFound("Backend does not support extents")
        with ticket.operation():
            if context == "zero":
                result = [{"start": e.start, "length": e.length,
                           "zero": e.zero, "hole": e.hole}
                          for e in _clip(backend.extents("zero"),
                                         ticket.size)]
            else:
                result = [{"start": e.start, "length": e.length,
                           "dirty": e.dirty, "zero": e.zero}
                          for e in _clip(backend.extents("dirty"),
                                         ticket.size)]
        resp.send_json(result, headers=CORS)


def _clip(extents, size):
    """Extents limited to the ticket's [0, size)."""
    for e in extents:
        if e.start >= size:
            break
        if e.start + e.length > size:
            e = e._replace(length=size - e.start)
        yield e


class Checksum:

    def __init__(self, store, cfg):
        self.store = store
        self.cfg = cfg

    def get(self, req, resp, ticket_id):
        ticket, backend, _ = open_image(req, ticket_id, "read", self.store,
                                        self.cfg)
        algorithm = req.query.get("algorithm", checksum.DEFAULT_ALGORITHM)
        raw = req.query.get("block_size", str(checksum.DEFAULT_BLOCK_SIZE))
        if not raw.isdigit() or len(raw) > 12:
            raise errors.BadRequest("Invalid block_size {!r}".format(raw))
        block_size = int(raw)
        checksum.validate_block_size(block_size)
        checksum.new_hash(algorithm)
        with ticket.operation(0, ticket.size) as op:
            remote = getattr(backend, "checksum", None)
            if remote is not None:
                # A proxy asks the daemon next to the data.
                result = remote(algorithm, block_size)
                op.progress(ticket.size)
            else:
                result = {"algorithm": algorithm, "block_size": block_size,
                          "checksum": checksum.compute(
                              backend, ticket.size, algorithm, block_size,
                              op.progress)}
        resp.send_json(result, headers=CORS)


class Algorithms:

    def __init__(self, store, cfg):
        self.store = store
        self.cfg = cfg

    def get(self, req, resp, ticket_id):
        open_image(req, ticket_id, "read", self.store, self.cfg)
        resp.send_json({"algorithms": checksum.algorithms()}, headers=CORS)
