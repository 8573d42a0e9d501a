"""/images/{ticket}/checksum and /images/{ticket}/checksum/algorithms."""

import concurrent.futures
import os
import threading

from .. import buffers
from .. import checksum
from .access import CORS, Resource, open_image, query_int

# One set of hashing threads for the daemon, a thread per core: checksum
# requests running at once share the cores (and their buffers come from
# the daemon's bounded pool) instead of each starting a thread per core.
_executor = None
_executor_lock = threading.Lock()


def _hashers():
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = concurrent.futures.ThreadPoolExecutor(
                os.cpu_count() or 1, thread_name_prefix="checksum")
        return _executor


def _pool_buffers(cfg):
    pool = buffers.pool(cfg)

    def lease():
        buf = pool.get(checksum.CHUNK + checksum.READ_SLACK)
        return buf, lambda: pool.release(buf)

    return lease


class Checksum(Resource):

    def get(self, req, resp, ticket_id):
        ticket, backend, _ = open_image(req.conn, ticket_id, "read",
                                        self.store, self.cfg, buffer=False)
        algorithm = req.query.get("algorithm", checksum.DEFAULT_ALGORITHM)
        block_size = query_int(req.query, "block_size",
                               checksum.DEFAULT_BLOCK_SIZE)
        checksum.validate_block_size(block_size)
        checksum.new_hash(algorithm)
        # A window of whole blocks (an extension: a client verifying an
        # upload window by window while the next ones move).
        ranged = "offset" in req.query or "length" in req.query
        offset = query_int(req.query, "offset", 0)
        length = query_int(req.query, "length", ticket.size - offset)
        end = checksum.check_window(ticket.size, block_size, offset, length)
        with ticket.operation(offset, end - offset) as op:
            if backend.checksum is not None and not ranged:
                # A proxy asks the daemon next to the data.
                result = backend.checksum(algorithm, block_size)
                op.progress(ticket.size)
            else:
                result = {"algorithm": algorithm, "block_size": block_size,
                          "checksum": checksum.compute(
                              backend, end, algorithm, block_size,
                              op.progress, executor=_hashers(),
                              buffers=_pool_buffers(self.cfg),
                              offset=offset)}
                if ranged:
                    result.update(offset=offset, length=end - offset)
        resp.send_json(result, headers=CORS)


class Algorithms(Resource):

    def get(self, req, resp, ticket_id):
        ticket, _, _ = open_image(req.conn, ticket_id, "read", self.store,
                                  self.cfg)
        # An operation, so a DELETE waits for this answer (or it is 403).
        with ticket.operation():
            # "windows": /checksum takes offset and length (this daemon's
            # extension; clients of the established API ignore it).
            resp.send_json({"algorithms": checksum.algorithms(),
                            "windows": True}, headers=CORS)
