"""The daemon's services, one per listening socket: remote (TCP, TLS),
local (unix socket), control (unix socket or TCP on localhost) and
metrics (TCP, when its port is set); ``create`` binds the enabled ones.

Each service holds its connections in a selector thread of its own and
runs their requests in its own worker threads (``imageio.connections``),
so a flood on the remote port cannot slow the control service down.
"""

import logging
import os
import socket

from . import connections
from . import http
from . import metrics
from .handlers import checksum, extents, images, info, tickets
from .handlers import metrics as metrics_handler

log = logging.getLogger("services")

# Connections the kernel completes before the daemon accepts them: a
# burst of clients (or of a flood) beyond it sees its SYNs dropped and
# retried a second later.  The kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 1024


class Service:
    """One listening socket and its connections (imageio.connections)."""

    name = "service"

    def __init__(self, sock, router, cfg, ssl_context=None):
        self._router = router
        self._cfg = cfg
        self._ssl = ssl_context
        self.server = connections.Server(
            self.name, sock, self._make_conn, ssl_context=ssl_context,
            max_clients=cfg.daemon.max_clients,
            header_timeout=cfg.daemon.header_timeout,
            idle_timeout=cfg.daemon.inactivity_timeout)

    def _make_conn(self, sock, name):
        return http.Connection(sock, self._router,
                               timeout=self._cfg.daemon.inactivity_timeout,
                               name=name, service=self.name)

    @property
    def address(self):
        return self.server.address

    def start(self):
        metrics.track_connections(self.name, self.server.connection_count)
        self.server.start()

    def stop(self):
        """Stop accepting and shut down open connections."""
        self.server.stop()

    def wait_connections(self, timeout):
        """Wait until connections end; return how many are left."""
        return self.server.wait_connections(timeout)


def _images_routes(store, cfg, local_socket, nbd=None):
    img = images.Images(store, cfg, local_socket, nbd)
    return [
        (r"/images/([^/]+)", img),
        (r"/images/([^/]+)/extents", extents.Extents(store, cfg)),
        (r"/images/([^/]+)/checksum", checksum.Checksum(store, cfg)),
        (r"/images/([^/]+)/checksum/algorithms",
         checksum.Algorithms(store, cfg)),
    ]


class RemoteService(Service):
    name = "remote"


class LocalService(Service):
    name = "local"


class ControlService(Service):
    name = "control"


class NbdService(Service):
    """Tickets over NBD (imageio.nbd): TCP, where TLS comes by STARTTLS
    with the remote service's credentials, or a unix socket."""

    def __init__(self, sock, store, cfg, name, tls_context=None):
        self.name = name
        self._store = store
        self._tls = tls_context
        super().__init__(sock, None, cfg)

    def _make_conn(self, sock, name):
        from .nbd import server as nbd_server
        return nbd_server.Connection(sock, self._store, self._cfg, name,
                                     self.name, tls_context=self._tls)


class MetricsService(Service):
    name = "metrics"


def bind_tcp(host, port):
    """Listen on host:port; ``::`` listens on IPv4 and IPv6."""
    if host in ("", "::", "0.0.0.0"):
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            addr = ("::", port)
        except OSError:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            addr = ("0.0.0.0", port)
    else:
        family, _, _, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def bind_unix(path, mode=None):
    """Listen on a unix socket.  ``path`` starting with NUL is abstract;
    "" picks a free abstract address (Linux autobind)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if path and not path.startswith("\0"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            os.makedirs(os.path.dirname(os.path.abspath(path)),
                        exist_ok=True)
        sock.bind(path)
        if mode is not None and path and not path.startswith("\0"):
            os.chmod(path, mode)
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def unix_address(sock):
    """The address clients connect to, as a string."""
    name = sock.getsockname()
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return name


def create(cfg, store, ssl_context=None):
    """Bind every enabled service; return the list (not started)."""
    services = []
    local_socket = None
    nbd_services = []
    nbd_info = None
    if cfg.nbd.enable:
        tls_context = None
        if cfg.nbd.tls:
            if ssl_context is None:
                from . import errors
                raise errors.ConfigError(
                    "[nbd] tls = true needs the remote service's TLS "
                    "([tls] enable = true), or set [nbd] tls = false")
            tls_context = ssl_context
        sock = bind_tcp(cfg.nbd.host, cfg.nbd.port)
        nbd_info = {"port": sock.getsockname()[1],
                    "tls": tls_context is not None}
        nbd_services.append(NbdService(sock, store, cfg, "nbd", tls_context))
        if cfg.nbd.socket:
            sock = bind_unix(cfg.nbd.socket)
            nbd_info["socket"] = unix_address(sock)
            nbd_services.append(NbdService(sock, store, cfg, "nbd-local"))

    if cfg.local.enable:
        sock = bind_unix(cfg.local.socket)
        local_socket = unix_address(sock)
        router = http.Router(
            _images_routes(store, cfg, local_socket, nbd_info))
        services.append(LocalService(sock, router, cfg))

    sock = bind_tcp(cfg.remote.host, cfg.remote.port)
    routes = _images_routes(store, cfg, local_socket, nbd_info)
    routes.append((r"/info/?", info.Info()))
    services.insert(0, RemoteService(sock, http.Router(routes), cfg,
                                     ssl_context))

    if cfg.control.enable:
        if cfg.control.transport == "unix":
            sock = bind_unix(cfg.control.socket, mode=0o660)
        elif cfg.control.transport == "tcp":
            host = "127.0.0.1" if cfg.control.prefer_ipv4 else "::1"
            sock = bind_tcp(host, max(cfg.control.port, 0))
        else:
            from . import errors
            raise errors.ConfigError(
                "Invalid [control] transport = {!r}: expected 'unix' or "
                "'tcp'".format(cfg.control.transport))
        router = http.Router([
            (r"/tickets/([^/]*)", tickets.Tickets(store, cfg)),
            (r"/metrics", metrics_handler.Metrics()),
        ])
        services.append(ControlService(sock, router, cfg))

    services.extend(nbd_services)

    if cfg.metrics.port >= 0:
        sock = bind_tcp(cfg.metrics.host, cfg.metrics.port)
        router = http.Router([(r"/metrics", metrics_handler.Metrics())])
        services.append(MetricsService(sock, router, cfg))
    return services


def describe(service):
    """Human readable address of a service, for logs."""
    addr = service.address
    if isinstance(addr, tuple):
        host, port = addr[0], addr[1]
        scheme = "https" if service._ssl else "http"
        if isinstance(service, NbdService):
            scheme = "nbds" if service._tls else "nbd"
        if ":" in host:
            host = "[{}]".format(host)
        return "{}://{}:{}".format(scheme, host, port)
    addr = addr.decode() if isinstance(addr, bytes) else addr
    if addr.startswith("\0"):
        return "unix:@" + addr[1:]
    return "unix:" + addr
