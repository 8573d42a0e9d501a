"""Verification: the block hash of what the client moved (or of its local
image) compared with the daemon's hash of its copy, in the fastest
algorithm both offer."""

import concurrent.futures
import logging
import threading

from .. import checksum as blkhash
from .. import errors

log = logging.getLogger("client")


class VerifyError(errors.Error):
    """The image the daemon holds differs from the local one."""


# The block hashes verification uses, the first the daemon offers (and
# this host has): BLAKE3 (SIMD) hashes 6 GB/s a core here, SHA-256 with
# the SHA extensions of current CPUs 1.7, blake2b (the fallback every
# daemon has) 0.9.
VERIFY_ALGORITHMS = ("blake3", "sha256")


def algorithm(http, wanted=None):
    """The verification's algorithm: ``wanted`` (an error when the daemon
    or this host lacks it), else the first of VERIFY_ALGORITHMS both
    offer, else blake2b."""
    offered = http.checksum_algorithms()
    here = blkhash.algorithms()
    if wanted is not None:
        if wanted not in here:
            raise errors.Error("Unsupported checksum algorithm {!r}; "
                               "supported: {}".format(wanted,
                                                      ", ".join(here)))
        if offered and wanted not in offered:
            raise errors.Error(
                "The daemon does not offer checksum algorithm {!r}; it "
                "offers: {}".format(wanted, ", ".join(offered)))
        return wanted
    for name in VERIFY_ALGORITHMS:
        if name in offered and name in here:
            return name
    return blkhash.DEFAULT_ALGORITHM


def hasher(algorithm, size):
    """A block hasher fed while the data flows."""
    return blkhash.BlockHasher(size, algorithm, blkhash.DEFAULT_BLOCK_SIZE)


class RemoteChecksum:
    """The daemon's block hash in ``hasher``'s algorithm, asked for now on
    a connection of its own; ``result()`` waits for it, ``cancel()`` (a
    failed transfer) closes the connection instead of waiting for a hash
    that may take minutes."""

    def __init__(self, http, hasher):
        self._http = http.clone()
        self._future = concurrent.futures.Future()
        threading.Thread(target=self._run, args=(hasher,), daemon=True,
                         name="checksum").start()

    def _run(self, hasher):
        try:
            self._future.set_result(self._http.checksum(
                hasher.algorithm, hasher.block_size)["checksum"])
        except BaseException as e:
            self._future.set_exception(e)
        finally:
            self._http.close()

    def result(self):
        return self._future.result()

    def cancel(self):
        self._http.close()


class _Serialized:
    """An NBD backend whose reads and extents run one at a time."""

    def __init__(self, nbd):
        self._nbd = nbd
        self._lock = threading.Lock()
        self.features = nbd.features

    def readinto(self, buf, offset, length):
        with self._lock:
            return self._nbd.readinto(buf, offset, length)

    def extents(self, offset, length, context="zero"):
        with self._lock:
            return list(self._nbd.extents(offset, length, context))


def verify(nbd, http, size, algorithm, hasher=None, remote=None,
            serial=False):
    """Compare the local block hash with the daemon's, computed next to
    its data (``remote``: already asked for during a download; else asked
    now).  The local one is ``hasher``'s (fed while the data flowed);
    without it (a resumed transfer, an incremental download) the local image
    is hashed now, on all cores, while the daemon hashes its copy."""
    if hasher is not None:
        if remote is None:
            remote = http.checksum(hasher.algorithm,
                                   hasher.block_size)["checksum"]
        local = hasher.hexdigest()
    else:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            remote = pool.submit(http.checksum, algorithm,
                                 blkhash.DEFAULT_BLOCK_SIZE)
            if serial:
                local = blkhash.compute(_Serialized(nbd), size,
                                        algorithm=algorithm, workers=1)
            else:
                local = blkhash.compute(nbd, size, algorithm=algorithm)
            remote = remote.result()["checksum"]
    if local != remote:
        raise VerifyError(
            "Verification failed: local image {} checksum {} differs from "
            "the daemon's {}".format(algorithm, local, remote))
    log.info("Verified: %s checksum %s", algorithm, local)
    return {"algorithm": algorithm, "checksum": local}
