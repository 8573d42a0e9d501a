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
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if t.enable_tls1_1:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        # OpenSSL 3 refuses TLS 1.1 at the default security level.
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    else:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
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
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.rename(tmp, path)
