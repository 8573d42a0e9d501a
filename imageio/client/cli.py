"""``ovirt-img``: upload, download, checksum and info of disk images
through an imageio daemon."""

import argparse
import json
import logging
import sys

from .. import errors
from . import _api
from .progress import ProgressBar

MiB = 1024**2


def _size(text):
    units = {"k": 1024, "m": MiB, "g": 1024 * MiB}
    n = text.strip().lower()
    mul = units.get(n[-1:], 1)
    if n[-1:] in units:
        n = n[:-1]
    return int(n) * mul


def _transfer_options(p):
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--cafile", help="CA certificate that signed the "
                     "daemon's certificate (default: the system CAs)")
    tls.add_argument("--insecure", action="store_true",
                     help="do not verify the daemon's certificate")
    p.add_argument("--max-workers", type=int, default=_api.MAX_WORKERS,
                   help="connections to use (at most the daemon's "
                   "max_readers/max_writers; default %(default)s)")
    p.add_argument("--buffer-size", type=_size, default=_api.BUFFER_SIZE,
                   help="bytes each connection moves at once "
                   "(default 4m)")
    p.add_argument("--compress", action="store_true",
                   help="zstd-compress data on the wire when the daemon "
                   "offers it: faster over slow links (1 Gbit/s, WAN), "
                   "costs CPU; never on the daemon's unix socket")
    p.add_argument("--no-verify", action="store_true",
                   help="do not compare block hashes after the transfer")
    p.add_argument("--algorithm", help="block hash of the verification "
                   "(default: xxh3_128 when the daemon offers it, else "
                   "blake3, else sha256, else blake2b)")
    p.add_argument("--resume", action="store_true",
                   help="send only what an interrupted run of the same "
                   "transfer did not confirm")
    p.add_argument("--transport", choices=("http", "nbd"), default="http",
                   help="move the data over HTTP (default) or over the "
                   "daemon's NBD endpoint, which OPTIONS advertises "
                   "(docs/nbd.md)")
    _output_option(p)


def _output_option(p):
    p.add_argument("-o", "--output", choices=("text", "json"),
                   default="text", help="progress as a bar (text) or one "
                   "JSON object a line (json)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log what the client does on stderr")


def parser():
    p = argparse.ArgumentParser(
        prog="ovirt-img",
        description="Move disk images through an imageio daemon.")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("upload", help="upload FILE (any format qemu "
                        "reads; or an http(s):// URL of one) to a "
                        "transfer URL")
    up.add_argument("filename", metavar="FILE")
    up.add_argument("url", metavar="URL")
    up.add_argument("--member", help="upload this member of the tar (OVA) "
                    "file FILE")
    up.add_argument("--format", help="format of FILE (default: probed; "
                    "give it for a disk whose content you do not control: "
                    "a raw disk is never probed as another format, and "
                    "only a qcow2's backing file is followed)")
    _transfer_options(up)
    up.set_defaults(run=_upload)

    down = sub.add_parser("download", help="download a transfer URL into "
                          "a new image FILE")
    down.add_argument("url", metavar="URL")
    down.add_argument("filename", metavar="FILE")
    down.add_argument("--format", choices=("raw", "qcow2"), default="qcow2",
                      help="format of FILE (default %(default)s)")
    down.add_argument("--incremental", action="store_true",
                      help="only the dirty extents, on top of "
                      "--backing-file")
    down.add_argument("--backing-file", metavar="BASE")
    down.add_argument("--backing-format", choices=("raw", "qcow2"))
    down.add_argument("--overwrite", action="store_true",
                      help="replace FILE if it exists (without it, an "
                      "existing FILE is an error unless --resume)")
    _transfer_options(down)
    down.set_defaults(run=_download)

    ck = sub.add_parser("checksum", help="block hash of a local image or "
                        "of a transfer URL")
    ck.add_argument("target", metavar="FILE|URL")
    ck.add_argument("--member")
    ck.add_argument("--algorithm", default=_api.blkhash.DEFAULT_ALGORITHM,
                    help="block hash: blake2b (default, as the established "
                    "daemon), sha256, blake3, xxh3_128 (fastest, not "
                    "cryptographic; both when the daemon offers them) or "
                    "another hashlib algorithm")
    tls = ck.add_mutually_exclusive_group()
    tls.add_argument("--cafile")
    tls.add_argument("--insecure", action="store_true")
    ck.add_argument("-v", "--verbose", action="store_true")
    ck.set_defaults(run=_checksum)

    inf = sub.add_parser("info", help="what the daemon says about a "
                         "transfer URL")
    inf.add_argument("url", metavar="URL")
    tls = inf.add_mutually_exclusive_group()
    tls.add_argument("--cafile")
    tls.add_argument("--insecure", action="store_true")
    inf.add_argument("-v", "--verbose", action="store_true")
    inf.set_defaults(run=_info)
    return p


def _progress(args, phase):
    if args.output == "json":
        return ProgressBar(phase=phase, output=sys.stdout, format="json")
    if sys.stderr.isatty():
        return ProgressBar(phase=phase, output=sys.stderr, format="text")
    # Not a terminal: no bar, so stderr holds only the error, if any.
    return _Quiet()


class _Quiet:
    phase = None

    def update(self, n):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        pass


def _common(args):
    return dict(cafile=args.cafile, secure=not args.insecure,
                buffer_size=args.buffer_size, max_workers=args.max_workers,
                verify=not args.no_verify, resume=args.resume,
                compress=args.compress, algorithm=args.algorithm,
                transport=args.transport)


def _upload(args):
    with _progress(args, "uploading") as progress:
        verified = _api.upload(args.filename, args.url, member=args.member,
                               fmt=args.format, progress=progress,
                               **_common(args))
        progress.phase = _done("upload", verified)


def _download(args):
    with _progress(args, "downloading") as progress:
        verified = _api.download(
            args.url, args.filename, fmt=args.format,
            incremental=args.incremental, backing_file=args.backing_file,
            backing_format=args.backing_format, overwrite=args.overwrite,
            progress=progress, **_common(args))
        progress.phase = _done("download", verified)


def _done(what, verified):
    if verified is None:
        return what + " completed"
    return "{} completed, verified ({})".format(what, verified["algorithm"])


def _checksum(args):
    if args.target.startswith(("https://", "http://")):
        result = _api.remote_checksum(args.target, args.cafile,
                                      secure=not args.insecure,
                                      algorithm=args.algorithm)
    else:
        result = _api.checksum(args.target, member=args.member,
                               algorithm=args.algorithm)
    print(json.dumps(result, indent=2))


def _info(args):
    from ..backends import http as http_backend
    backend = http_backend.HTTPBackend(args.url, cafile=args.cafile,
                                       secure=not args.insecure,
                                       ca_hint="check --cafile")
    try:
        out = dict(backend.options)
        out["size"] = backend.size()
        if "extents" in backend.features:
            data = zero = 0
            count = 0
            for e in backend.extents(context="zero"):
                count += 1
                if e.zero:
                    zero += e.length
                else:
                    data += e.length
            out["extents"] = {"count": count, "data": data, "zero": zero}
    finally:
        backend.close()
    print(json.dumps(out, indent=2))


def main(argv=None):
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.ERROR,
        format="%(levelname)s %(name)s: %(message)s")
    try:
        args.run(args)
    except KeyboardInterrupt:
        sys.stderr.write("ovirt-img: interrupted\n")
        return 1
    except (errors.Error, OSError) as e:
        sys.stderr.write("ovirt-img: {}\n".format(_one_line(e)))
        return 1
    return 0


def _one_line(e):
    text = str(e) or type(e).__name__
    if isinstance(e, errors.PartialContent):
        text = "the daemon closed the connection mid-transfer ({})".format(
            text)
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
