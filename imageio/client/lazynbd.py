"""Connections to the private qemu-nbd, made on first use.

An upload whose data the source file holds (client.direct) may never ask
qemu-nbd for a byte: its workers' NBD connections are then never made, and
qemu-nbd's start-up (~10 ms to open the image) and the handshakes run
beside the rest instead of before the copy.  Any use (a compressed
cluster, a backing file's data, a verification that hashes the image)
waits for qemu-nbd and connects then.
"""

import threading

from ..backends import nbd as nbd_backend


class LazyNbd:
    """An ``NbdBackend`` connected on first use of any attribute but
    ``clone`` and ``close``; ``ready()`` waits for the server (see
    ``qemu.start``).  Clones are lazy too."""

    def __init__(self, url, ready, buffer_size):
        self._url = url
        self._ready = ready
        self._buffer_size = buffer_size
        self._lock = threading.Lock()
        self._nbd = None
        self._closed = False

    def _connection(self):
        with self._lock:
            if self._closed:
                raise RuntimeError("NBD connection closed")
            if self._nbd is None:
                self._ready()
                self._nbd = nbd_backend.connect(
                    self._url, buffer_size=self._buffer_size)
            return self._nbd

    def __getattr__(self, name):
        return getattr(self._connection(), name)

    def clone(self):
        return LazyNbd(self._url, self._ready, self._buffer_size)

    def close(self):
        with self._lock:
            nbd, self._nbd = self._nbd, None
            self._closed = True
        if nbd is not None:
            nbd.close()
