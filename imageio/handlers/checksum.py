"""/images/{ticket}/checksum and /images/{ticket}/checksum/algorithms."""

from .. import checksum
from .access import CORS, Resource, open_image, query_int


class Checksum(Resource):

    def get(self, req, resp, ticket_id):
        ticket, backend, _ = open_image(req, ticket_id, "read", self.store,
                                        self.cfg)
        algorithm = req.query.get("algorithm", checksum.DEFAULT_ALGORITHM)
        block_size = query_int(req.query, "block_size",
                               checksum.DEFAULT_BLOCK_SIZE)
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


class Algorithms(Resource):

    def get(self, req, resp, ticket_id):
        ticket, _, _ = open_image(req, ticket_id, "read", self.store,
                                  self.cfg)
        # An operation, so a DELETE waits for this answer (or it is 403).
        with ticket.operation():
            resp.send_json({"algorithms": checksum.algorithms()},
                           headers=CORS)
