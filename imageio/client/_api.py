"""``imageio.client``: the names and arguments of the established
``ovirt_imageio.client``, over this project's backends.

Python plans here; bytes move between ``backends.nbd`` (a private
qemu-nbd) and ``backends.http`` (the daemon) in ``imageio._io``.
"""

import bisect
import concurrent.futures
import contextlib
import logging
import math
import os
import threading

from .. import checksum as blkhash
from .. import compression
from .. import errors
from .. import extents as extents_
from ..backends import http as http_backend
from ..backends import nbd as nbd_backend
from . import journal as journal_mod
from . import lazynbd
from . import direct
from . import nbd_transport
from . import qcow2
from . import qemu
from . import transfer
from . import verify as verify_

log = logging.getLogger("client")

MiB = 1024**2
BUFFER_SIZE = 4 * MiB
MAX_WORKERS = 4
# Connections a private qemu-nbd accepts (workers + one for checksums).
NBD_SHARED = 9


def _open_http(url, cafile, secure, proxy_url=None, transport="http",
               buffer_size=None):
    """The daemon's transfer URL: HTTP, or with ``transport="nbd"`` its
    data over the daemon's NBD endpoint (client.nbd_transport)."""
    if transport not in ("http", "nbd"):
        raise errors.Error("Unknown transport {!r}: expected http or "
                           "nbd".format(transport))
    try:
        http = http_backend.HTTPBackend(url, cafile=cafile, secure=secure,
                                        ca_hint="check --cafile")
    except errors.BadGateway:
        if proxy_url is None:
            raise
        log.info("Cannot use %s, trying %s", url, proxy_url)
        http = http_backend.HTTPBackend(proxy_url, cafile=cafile,
                                        secure=secure,
                                        ca_hint="check --cafile")
    if transport == "http":
        return http
    try:
        return nbd_transport.NbdPath(http, cafile, secure, buffer_size)
    except BaseException:
        http.close()
        raise


def _progress_start(progress, size):
    if progress is not None and hasattr(progress, "size"):
        try:
            progress.size = size
        except AttributeError:
            pass


def _endpoints(kind, nbd, http, workers, buffer_size, local=None):
    """The first endpoint on the caller's connections, the others on
    clones, opened at the same time (each is two connections and a TLS
    handshake: over a link with latency, in turn they add up)."""
    def clone():
        n = nbd.clone()
        try:
            return kind(n, http.clone(), buffer_size, local)
        except BaseException:
            n.close()
            raise

    eps = [kind(nbd, http, buffer_size, local)]
    if workers < 2:
        return eps
    with concurrent.futures.ThreadPoolExecutor(workers - 1) as pool:
        futures = [pool.submit(clone) for _ in range(workers - 1)]
    failures = []
    for f in futures:
        try:
            eps.append(f.result())
        except BaseException as e:
            failures.append(e)
    if failures:
        for ep in eps[1:]:
            ep.close()
        raise failures[0]
    return eps


def _copy(kind, nbd, http, tasks, workers, buffer_size, progress,
          journal, hasher=None, skip=None, windows=None, stop=None,
          local=None):
    eps = _endpoints(kind, nbd, http, workers, buffer_size, local)
    try:
        transfer.run(tasks, eps,
                     progress=progress.update if progress else None,
                     done=journal.record if journal else None,
                     hasher=hasher, skip=skip,
                     moved=(lambda item: windows.moved(item.start,
                                                       item.length))
                     if windows else None, stop=stop)
    finally:
        # The first endpoint's connections belong to the caller.
        for ep in eps[1:]:
            ep.close()


class _ZeroRanges:
    """Ranges known to read as zero (the target's zero extents)."""

    def __init__(self, extents):
        self._starts, self._ends = [], []
        for e in extents:
            if e.zero:
                self._starts.append(e.start)
                self._ends.append(e.start + e.length)

    def covers(self, start, length):
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= start + length


def _resume(journal, resume, flush):
    """The (start, length) an earlier run confirmed (``--resume``); the
    journal is open for this run's, ``flush()`` making them durable."""
    done = journal.load() if resume else set()
    journal.start(keep=resume, flush=flush)
    if done:
        log.info("Resuming: %d requests already confirmed", len(done))
    return done


def _not_done(items, done, progress):
    """Yield ``items`` but those in ``done`` (counted as transferred)."""
    for item in items:
        if (item.start, item.length) in done:
            if progress:
                progress.update(item.length)
        else:
            yield item


def upload(filename, url, cafile, buffer_size=BUFFER_SIZE, secure=True,
           progress=None, proxy_url=None, max_workers=MAX_WORKERS,
           member=None, backing_chain=True, disk_is_zero=False,
           verify=False, resume=False, compress=False, fmt=None,
           algorithm=None, transport="http"):
    """Upload the guest data of ``filename`` (any format qemu reads; with
    ``member``, a member of the tar file ``filename``) to the transfer
    ``url``.  ``fmt`` is the source's format (None: probed by qemu; give
    it for a disk of unknown content: a raw disk whose guest wrote an
    image header is probed as that format).  A backing file is followed
    only for a qcow2 source and ``backing_chain``.  ``verify`` compares
    block hashes after the transfer; ``resume`` skips requests an
    interrupted run confirmed; ``compress`` sends data zstd-coded when
    the daemon offers it (plain bytes otherwise).  ``algorithm`` is the
    verification's block hash (None: the fastest the daemon offers).
    ``transport="nbd"`` moves the data over the daemon's NBD endpoint.
    Returns ``{"algorithm", "checksum"}`` verified, or None.  Raises
    errors.Error subclasses with messages a user can act on."""
    image = qemu.info(filename, member, fmt)
    log.info("Source %s: format %s (%s)", filename, image["format"],
             "given" if fmt else "probed")
    # The data the source file holds as it is: read there (client.direct),
    # its map the plan's extents, mapped while the rest gets ready.
    source = None
    if direct.usable(filename, image, member):
        source = direct.DirectSource(filename, image["format"],
                                     image["virtual-size"], backing_chain)
    with contextlib.ExitStack() as stack:
        if source is not None:
            stack.callback(source.close)
            source.start()
        http = _open_http(url, cafile, secure, proxy_url, transport,
                          buffer_size)
        try:
            if compress:
                http.use_zstd()
            size = image["virtual-size"]
            if size > http.size():
                raise errors.Error(
                    "Target too small: {} has {} bytes, the image needs {}"
                    .format(url, http.size(), size))
            _progress_start(progress, size)
            if qemu.is_url(filename):
                # qemu 7.2's curl driver (the reader when nbdkit is missing)
                # can hang forever when requests run at once (qemu-img
                # convert -m 8 of a qcow2 from nginx: 3 in 20 hung; -m 1:
                # none in 25): one request at a time, whichever reads it.
                log.info("Source is a URL: one request at a time")
                max_workers = 1
            # qemu-nbd starts now; its connections are made when first used
            # (client.lazynbd): with the data read from the source file, maybe
            # never.
            with qemu.start(filename, image["format"], member=member,
                            shared=NBD_SHARED,
                            backing_chain=backing_chain) as (nbd_url, ready):
                nbd = lazynbd.LazyNbd(nbd_url, ready, buffer_size)
                try:
                    # The source's extents come piece by piece on a connection
                    # of their own while the workers copy (from a URL: all of
                    # them first).
                    extents_nbd = nbd.clone()
                    if qemu.is_url(filename):
                        extents_nbd = _Prefetched(extents_nbd, size)
                    try:
                        journal = journal_mod.Journal(
                            "upload", filename, url,
                            journal_mod.source_identity(filename))
                        return _upload(
                            nbd, extents_nbd, http, size, buffer_size,
                            progress, max_workers, disk_is_zero, journal,
                            verify_.algorithm(http, algorithm) if verify
                            else None, resume, source)
                    finally:
                        extents_nbd.close()
                finally:
                    nbd.close()
        finally:
            http.close()



class _Prefetched:
    """The extents of an NBD export, all asked for at once, then answered
    from memory: no request runs beside the copy's."""

    def __init__(self, nbd, size):
        self._nbd = nbd
        self._extents = [e for batch in extents_.windows(
            lambda pos, n: nbd.extents(pos, n, "zero"), 0, size,
            transfer.EXTENTS_STEP) for e in batch]

    def extents(self, offset, length, context="zero"):
        end = offset + length
        out = []
        for e in self._extents:
            if e.start < end and e.start + e.length > offset:
                start = max(e.start, offset)
                out.append(e._replace(start=start, length=min(
                    e.start + e.length, end) - start))
        return out

    def close(self):
        self._nbd.close()


def _upload(nbd, extents_nbd, http, size, buffer_size, progress,
            max_workers, disk_is_zero, journal, verify, resume, source=None):
    # A compressed PUT the daemon decodes whole before writing (docs/api.md,
    # "Compression"): a refused one leaves the image unchanged.
    request_size = compression.DECODE_SIZE if http.coding \
        else transfer.REQUEST_SIZE
    target_zero = _target_zero(http, disk_is_zero)
    can_flush = "flush" in http.features or not http.features
    # Journaled requests are flushed first, on a connection of their own.
    flusher = http.clone() if can_flush else None
    try:
        done = _resume(journal, resume,
                       flusher.flush if flusher else None)
        verified = _upload_items(
            nbd, extents_nbd, http, size, buffer_size, progress,
            max_workers, target_zero, journal, done, verify, request_size,
            can_flush, source)
    finally:
        if flusher is not None:
            flusher.close()
    journal.remove()
    return verified


def _upload_items(nbd, extents_nbd, http, size, buffer_size, progress,
                  max_workers, target_zero, journal, done, verify,
                  request_size, can_flush, source=None):
    def skip(item):
        return target_zero.covers(item.start, item.length)

    hasher = verify_.hasher(verify, size) if verify and not done else None
    workers = max(1, min(max_workers, http.max_writers))
    # Each window of the image is read back from the daemon's storage and
    # compared as soon as it is written, while the next windows move.
    windows = verifier = None
    stop = threading.Event()
    # (A smaller source is verified as before, against the whole image.)
    if hasher is not None and size == http.size():
        windows = verify_.Windows(size, verify_.window_size(
            size, math.lcm(hasher.block_size, request_size),
            verify_.UPLOAD_WINDOW_PARTS))
        check, remote, close_check = verify_.upload_check(http, hasher,
                                                          size)
        verifier = verify_.WindowVerifier(windows, check, stop)
    try:
        found = source.map() if source is not None else \
            transfer.source_extents(extents_nbd, size)
        items = transfer.iplan(transfer.merged(found),
                               request_size=request_size)
        todo = _not_done(items, done, progress)
        _copy(transfer.Upload, nbd, http, transfer.tasks(todo, request_size),
              workers, buffer_size, progress, journal, hasher, skip,
              windows, stop, source)
        if source is not None:
            log.info("Read %d bytes from the source file directly, the "
                     "rest of the data through qemu-nbd", source.moved)
        if can_flush:
            http.flush()
        if verifier is not None:
            verifier.result()
    except BaseException:
        if verifier is not None:
            verifier.cancel()
        raise
    finally:
        journal.close()
        if verifier is not None:
            close_check()
    if verifier is not None:
        return verify_.verified(hasher, remote)
    if verify:
        # One worker: perhaps a URL's curl driver (see upload()), whose
        # hash after a resume must read one request at a time too.
        return verify_.verify(nbd, http, size, verify, hasher,
                       serial=workers == 1)
    return None


def _target_zero(http, disk_is_zero):
    class All:
        def covers(self, start, length):
            return True
    if disk_is_zero:
        return All()
    if "extents" not in http.features:
        return _ZeroRanges(())
    return _ZeroRanges(http.extents(context="zero"))


def download(url, filename, cafile, fmt="qcow2", incremental=False,
             buffer_size=BUFFER_SIZE, secure=True, progress=None,
             proxy_url=None, max_workers=MAX_WORKERS, backing_file=None,
             backing_format=None, verify=False, resume=False,
             compress=False, overwrite=True, algorithm=None,
             transport="http"):
    """Download the transfer ``url`` into a new image ``filename`` in
    format ``fmt`` ("raw" or "qcow2").  Only data extents are read; zero
    extents stay unallocated.  With ``incremental``, only the dirty extents,
    into a qcow2 on top of ``backing_file``.  ``compress`` asks for data
    zstd-coded when the daemon offers it.  An existing ``filename`` is
    replaced only with ``overwrite`` (True, as the established client
    does; ``ovirt-img`` passes False unless ``--overwrite``), or continued
    with ``resume``.  ``algorithm``, ``transport`` and the result: as
    ``upload``'s.  Raises errors.Error subclasses."""
    if fmt not in ("raw", "qcow2"):
        raise errors.Error("Unsupported format {!r}: raw or qcow2".format(
            fmt))
    if incremental and (fmt != "qcow2" or not backing_file):
        raise errors.Error("An incremental download needs --format qcow2 "
                           "and --backing-file BASE")
    http = _open_http(url, cafile, secure, proxy_url, transport,
                      buffer_size)
    try:
        if compress:
            http.use_zstd()
        size = http.size()
        _progress_start(progress, size)
        if incremental:
            dirty = [(e.start, e.length, e.zero)
                     for e in http.extents(context="dirty") if e.dirty]
            items = transfer.plan(dirty)
            skip = None
            # Clean extents come from the backing file: not copied.
            if progress:
                progress.update(size - sum(e[1] for e in dirty))
        else:
            items = transfer.plan(transfer.merged(
                (e.start, e.length, e.zero) for e in http.extents(context="zero")))
            if backing_file:
                # BASE shows through the holes of a new image on top of
                # it: where the remote reads zero, zeroes are written
                # (qcow2 zero clusters), so the image reads as the remote.
                skip = None
            else:
                def skip(item):
                    # A new image reads as zero: zero extents stay holes.
                    return True

        journal = journal_mod.Journal("download", filename, url)
        # A new image without a backing file is laid out for the data
        # (client.qcow2), and the workers write it themselves
        # (client.direct.DirectTarget); otherwise through qemu-nbd.
        layout = None
        if not incremental and not backing_file and (
                not os.path.lexists(filename) or os.path.isfile(filename)):
            layout = [(i.start, i.length) for i in items if not i.zero]
        resume, runs = _download_target(
            journal, filename, resume, overwrite, fmt, size, backing_file,
            backing_format, layout)
        # The journal is this image's: same remote size, same local file.
        st = os.stat(filename)
        journal.identity = {"size": size, "inode": st.st_ino,
                            "device": st.st_dev}
        target = None
        if runs is not None:
            target = direct.DirectTarget(filename, size, runs)
            log.info("Writing the data into %s directly (%d runs)",
                     filename, len(runs))
        # Writing the file itself, the private qemu-nbd only reads (the
        # read-back's fallback): it never writes metadata behind ours.
        with contextlib.ExitStack() as stack:
            if target is not None:
                stack.callback(target.close)
            nbd_url, ready = stack.enter_context(qemu.start(
                filename, fmt, read_only=target is not None,
                shared=NBD_SHARED))
            # Connected when first used (client.lazynbd): writing the file
            # itself, maybe never.
            nbd = lazynbd.LazyNbd(nbd_url, ready, buffer_size)
            # Journaled requests are flushed first, on a connection of
            # their own.
            flusher = nbd.clone()
            flush = target.flush if target is not None else flusher.flush
            try:
                done = _resume(journal, resume, flush)
                todo = _not_done(items, done, progress)
                # Clean extents of an incremental download are not moved:
                # the local image is hashed after the transfer.
                check = verify_.algorithm(http, algorithm) if verify \
                    else None
                hasher = verify_.hasher(check, size) if check and \
                    not incremental and not done else None
                workers = max(1, min(max_workers, http.max_readers))
                # A download does not change the daemon's image: its hash
                # is computed while the data flows too, on a connection of
                # its own; the local image is read back and hashed window
                # by window as each is written, while the next ones move.
                remote = verifier = windows = None
                stop = threading.Event()
                if hasher is not None:
                    remote = verify_.RemoteChecksum(http, hasher)
                    windows = verify_.Windows(size, verify_.window_size(
                        size, math.lcm(hasher.block_size,
                                       transfer.REQUEST_SIZE)))
                    # The read-back reads the file where qemu-img map
                    # places the window's data (client.direct).
                    readback_source = direct.DirectSource(
                        filename, fmt, size, force_share=True)
                    local_check, close_check = verify_.download_check(
                        nbd, hasher, readback_source,
                        target.flush if target is not None else None)
                    verifier = verify_.WindowVerifier(windows, local_check,
                                                      stop)
                try:
                    _copy(transfer.Download, nbd, http,
                          transfer.tasks(todo), workers, buffer_size,
                          progress, journal, None, skip, windows, stop,
                          target)
                    flush()
                    if verifier is not None:
                        verifier.result()
                except BaseException:
                    if remote is not None:
                        remote.cancel()
                    if verifier is not None:
                        verifier.cancel()
                    raise
                finally:
                    journal.close()
                    if verifier is not None:
                        close_check()
                        readback_source.close()
                if verifier is not None:
                    verified = verify_.compare(hasher.hexdigest(),
                                               remote.result(), check)
                else:
                    verified = verify_.verify(nbd, http, size, check) \
                        if check else None
                journal.remove()
                return verified
            finally:
                flusher.close()
                nbd.close()
    finally:
        http.close()


def _download_target(journal, filename, resume, overwrite, fmt, size,
                     backing_file, backing_format, layout=None):
    """Create the download's image, or keep it to resume; return whether
    to resume, and where a new image's data goes (``_create_target``).
    An existing file is never replaced unless ``overwrite``."""
    exists = os.path.lexists(filename)
    if resume and exists and os.path.exists(journal.path):
        return True, None
    if exists and not overwrite:
        raise errors.Error(
            "{} exists: not overwritten (--overwrite replaces it; "
            "--resume continues an interrupted download into it)".format(
                filename))
    return False, _create_target(filename, fmt, size, backing_file,
                                 backing_format, layout)


def _create_target(filename, fmt, size, backing_file, backing_format,
                   layout=None):
    """Create the image; with ``layout`` (the data's ``(start,
    length)``), return the ``(guest_start, length, host_offset)`` runs
    where its data goes in the file (client.qcow2 lays out a qcow2; a raw
    file is its own map), else None."""
    directory = os.path.dirname(os.path.abspath(filename))
    if not os.access(directory, os.W_OK):
        raise errors.Error("Cannot write {}: directory {} is not "
                           "writable".format(filename, directory))
    if layout is not None and fmt == "qcow2":
        try:
            return qcow2.create(filename, size, layout).runs
        except OSError as e:
            raise errors.Error("Cannot create {}: {}".format(
                filename, e.strerror or e))
    qemu.create(filename, fmt, size, backing_file, backing_format)
    if layout is not None:
        return [(0, size, 0)]
    return None


def checksum(filename, member=None, block_size=blkhash.DEFAULT_BLOCK_SIZE,
             algorithm=blkhash.DEFAULT_ALGORITHM, detect_zeroes=True):
    """The block hash of ``filename``'s guest data (section 5 of the
    spec): ``{"algorithm", "block_size", "checksum"}``.  Zero extents are
    never read, whatever ``detect_zeroes`` says (the digest is the same)."""
    image = qemu.info(filename, member)
    with qemu.serve(filename, image["format"], member=member,
                    shared=NBD_SHARED) as nbd_url:
        nbd = nbd_backend.connect(nbd_url)
        try:
            digest = blkhash.compute(nbd, nbd.size(), algorithm=algorithm,
                                     block_size=block_size)
        finally:
            nbd.close()
    return {"algorithm": algorithm, "block_size": block_size,
            "checksum": digest}


def remote_checksum(url, cafile, secure=True,
                    block_size=blkhash.DEFAULT_BLOCK_SIZE,
                    algorithm=blkhash.DEFAULT_ALGORITHM):
    """The daemon's block hash of the image at ``url``."""
    http = _open_http(url, cafile, secure)
    try:
        return http.checksum(algorithm, block_size)
    finally:
        http.close()


def info(filename, member=None):
    """``qemu-img info`` of ``filename`` (or of tar member ``member``)."""
    return qemu.info(filename, member)


def measure(filename, dst_fmt, member=None):
    """``qemu-img measure`` of converting ``filename`` to ``dst_fmt``."""
    return qemu.measure(filename, dst_fmt, member)


def extents(filename, member=None, bitmap=None):
    """Iterate over the extents of ``filename``'s guest data, like the
    ``/extents`` API: zero extents, or with ``bitmap`` the dirty extents
    of that qcow2 bitmap."""
    image = qemu.info(filename, member)
    with qemu.serve(filename, image["format"], member=member,
                    bitmap=bitmap) as nbd_url:
        nbd = nbd_backend.connect(nbd_url, dirty=bitmap is not None)
        try:
            result = nbd.extents(context="dirty" if bitmap else "zero")
        finally:
            nbd.close()
    yield from result


class ImageioClient:
    """A connection to one image on an imageio daemon, with the
    established client's methods."""

    def __init__(self, transfer_url, cafile=None, secure=True,
                 proxy_url=None, buffer_size=BUFFER_SIZE):
        self._backend = _open_http(transfer_url, cafile, secure, proxy_url)
        self._buffer_size = buffer_size

    def __enter__(self):
        return self

    def __exit__(self, t, v, tb):
        self.close()

    @property
    def max_writers(self):
        return self._backend.max_writers

    @property
    def max_readers(self):
        return self._backend.max_readers

    def size(self):
        return self._backend.size()

    def extents(self, offset=0, length=None, context="zero"):
        yield from self._backend.extents(offset, length, context)

    def read(self, offset, buffer):
        """Read ``len(buffer)`` bytes at ``offset`` into ``buffer``."""
        n = len(memoryview(buffer))
        view = self._backend.readinto(buffer, offset, n)
        return len(view)

    def write(self, offset, buffer):
        """Write ``buffer`` at ``offset``."""
        self._backend.write(memoryview(buffer), offset)
        return len(memoryview(buffer))

    def read_from(self, reader, offset, length):
        """Write ``length`` bytes read from file-like ``reader`` at
        ``offset``."""
        buf = bytearray(min(self._buffer_size, length) or 1)
        while length:
            n = min(len(buf), length)
            view = memoryview(buf)[:n]
            got = 0
            while got < n:
                k = reader.readinto(view[got:])
                if not k:
                    raise errors.PartialContent(n, got)
                got += k
            self._backend.write(view, offset)
            offset += n
            length -= n

    def write_to(self, writer, offset, length):
        """Write ``length`` bytes of the image at ``offset`` to file-like
        ``writer``."""
        buf = bytearray(min(self._buffer_size, length) or 1)
        while length:
            n = min(len(buf), length)
            writer.write(self._backend.readinto(buf, offset, n))
            offset += n
            length -= n

    def zero(self, offset, length):
        self._backend.zero(offset, length, True)

    def flush(self):
        self._backend.flush()

    def close(self):
        self._backend.close()
