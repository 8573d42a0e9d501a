"""TLS: server and client SSL contexts, and the development PKI.

The remote service uses the standard library's ssl module.  The
development PKI (a CA and a localhost server certificate) is made with
``cryptography`` when ``[tls] create_dev_pki`` asks for it and the files
are missing: the example configuration runs with TLS out of the box, while
a production configuration with missing files stops start-up with a
message saying how to fix it.
"""

import datetime
import ipaddress
import logging
import os
import ssl
import stat
import struct

from . import errors

log = logging.getLogger("tls")


def server_context(cfg):
    """SSL context for the remote service.  Raises ConfigError when the
    key or certificate is missing or unusable."""
    t = cfg.tls
    if not t.key_file or not t.cert_file:
        raise errors.ConfigError(
            "TLS is enabled but [tls] key_file and cert_file are not set: "
            "set them to the server's PEM key and certificate, or disable "
            "TLS with '[tls] enable = false'")
    for option in ("key_file", "cert_file"):
        path = getattr(t, option)
        if not os.path.exists(path):
            raise errors.ConfigError(
                "TLS is enabled but [tls] {} = {} does not exist: create "
                "it, point the option to the right file, or disable TLS "
                "with '[tls] enable = false'".format(option, path))
    check_key_mode(t.key_file)
    ctx = _context(t, ssl.TLSVersion.TLSv1_2)
    if t.enable_tls1_1:
        # OpenSSL 3 refuses TLS 1.1 at the default security level, and
        # the level is a context's: a TLS 1.1 client is moved, when its
        # ClientHello arrives, to a context at level 0; everyone else
        # keeps the default level (no SHA-1 signatures, no small keys).
        legacy = _context(t, ssl.TLSVersion.TLSv1_1)
        legacy.set_ciphers("DEFAULT:@SECLEVEL=0")
        first = _context(t, ssl.TLSVersion.TLSv1_1)

        def on_message(conn, direction, version, content_type, msg_type,
                       data):
            if direction == "read" and \
                    msg_type == ssl._TLSMessageType.CLIENT_HELLO and \
                    content_type == ssl._TLSContentType.HANDSHAKE:
                # The context without this callback: nothing more to see,
                # and the data path pays no Python call per record.
                old = _max_version(data) in (0x0301, 0x0302)
                conn.context = legacy if old else ctx

        first._msg_callback = on_message
        return first
    return ctx


def _context(t, minimum):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = minimum
    try:
        ctx.load_cert_chain(t.cert_file, t.key_file)
        if t.ca_file:
            ctx.load_verify_locations(t.ca_file)
    except (OSError, ssl.SSLError) as e:
        raise errors.ConfigError(
            "Cannot load TLS key/certificate ([tls] key_file={}, "
            "cert_file={}, ca_file={}): {}".format(
                t.key_file, t.cert_file, t.ca_file, e))
    return ctx


def _max_version(hello):
    """The highest TLS version a ClientHello handshake message offers
    (0x0302 is TLS 1.1); 0 when it cannot be read."""
    try:
        p = 4  # Handshake type and length.
        legacy = struct.unpack_from(">H", hello, p)[0]
        p += 2 + 32  # Version, random.
        p += 1 + hello[p]  # Session id.
        p += 2 + struct.unpack_from(">H", hello, p)[0]  # Cipher suites.
        p += 1 + hello[p]  # Compression methods.
        if p + 2 > len(hello):
            return legacy
        end = p + 2 + struct.unpack_from(">H", hello, p)[0]
        p += 2
        while p + 4 <= end:
            kind, size = struct.unpack_from(">HH", hello, p)
            p += 4
            if kind == 43:  # supported_versions
                versions = hello[p + 1:p + 1 + hello[p]]
                return max(struct.unpack_from(">H", versions, i)[0]
                           for i in range(0, len(versions) - 1, 2))
            p += size
        return legacy
    except (IndexError, struct.error, ValueError):
        return 0


def check_key_mode(path):
    """Warn about a private key other users may read: whoever reads it can
    impersonate the host.  Group access is fine (vdsm's key is 0440
    vdsm:kvm).  A warning, not a refusal: the established daemon never
    checked, and a host it served must keep starting after an upgrade;
    the admin is told how to fix it."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o007:
        log.warning(
            "TLS key [tls] key_file = %s is accessible by other users "
            "(mode %04o): anyone on the host can impersonate this daemon; "
            "make it readable only by its owner and group (chmod o-rwx %s)",
            path, mode, path)


def client_context(ca_file):
    """SSL context verifying a remote imageio daemon against ``ca_file``
    (system CAs when empty)."""
    ctx = ssl.create_default_context(cafile=ca_file or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def create_dev_pki(key_file, cert_file, ca_file, hosts=("localhost",),
                   addresses=("127.0.0.1", "::1")):
    """Create a CA and a server certificate for ``hosts`` and IP
    ``addresses`` unless the files exist.  Development only."""
    if all(os.path.exists(p) for p in (key_file, cert_file, ca_file)):
        return False
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start = now - datetime.timedelta(days=1)
    end = now + datetime.timedelta(days=3650)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(
        NameOID.COMMON_NAME, "imageio development CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True,
            content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(
            ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256()))

    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName(h) for h in hosts]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(
            NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(names), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                       True)
        .add_extension(x509.ExtendedKeyUsage(
            [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256()))

    for path in (key_file, cert_file, ca_file):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _write(key_file, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), 0o600)
    _write(cert_file, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(ca_file, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    log.info("Created development PKI: CA %s, certificate %s, key %s",
             ca_file, cert_file, key_file)
    return True


def _write(path, data, mode):
    # A new file, never through a link someone planted where the file or
    # its temporary goes (a key written into their file, or over ours):
    # O_EXCL fails on any existing name, O_NOFOLLOW on a symlink.
    tmp = path + ".tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL |
                     os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except FileExistsError:
        raise errors.ConfigError(
            "Cannot create the development PKI: {} exists (a file left by "
            "an interrupted run, or planted): remove it".format(
                tmp)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.rename(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
