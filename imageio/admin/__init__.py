"""imageio.admin: manage the daemon's tickets over its control service.

    from imageio import admin

    cfg = admin.load_config("/etc/ovirt-imageio")
    with admin.Client(cfg) as c:
        c.add_ticket({"uuid": ..., "size": ..., "url": ..., "timeout": 300,
                      "ops": ["read"]})
        print(c.get_ticket(ticket_id))
        c.mod_ticket(ticket_id, {"timeout": 600})
        c.del_ticket(ticket_id)

Errors are ``imageio.admin.Error`` subclasses: ``ServerError`` carries the
server's ``status`` and ``message``; ``ConnectionFailed`` means the daemon
could not be reached.
"""

import http.client
import json
import socket
import urllib.parse

from .. import config
from .. import errors as _errors

DEFAULT_CONFDIR = "/etc/ovirt-imageio"


class Error(Exception):
    """Base of imageio.admin errors."""


class ConnectionFailed(Error):
    """The control service could not be reached."""


class ServerError(Error):
    """The control service answered with an error."""

    def __init__(self, status, message):
        super().__init__("{} (HTTP {})".format(message, status))
        self.status = status
        self.message = message


class NotFound(ServerError):
    """No such ticket."""


def load_config(confdir=DEFAULT_CONFDIR):
    """Load the daemon configuration of ``confdir``; raises Error."""
    try:
        return config.load(confdir)
    except _errors.ConfigError as e:
        raise Error(str(e))


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix socket (the control service; tests and
    benchmarks use it for the local service too)."""

    def __init__(self, path, timeout=60, blocksize=1024 * 1024):
        super().__init__("localhost", timeout=timeout, blocksize=blocksize)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


class Client:
    """A connection to the daemon's control service."""

    def __init__(self, cfg, timeout=90):
        c = cfg.control
        if c.transport == "unix":
            self.address = c.socket
            self._con = UnixHTTPConnection(c.socket, timeout)
        else:
            host = "127.0.0.1" if c.prefer_ipv4 else "::1"
            self.address = "{}:{}".format(host, c.port)
            self._con = http.client.HTTPConnection(host, c.port,
                                                   timeout=timeout)

    def add_ticket(self, ticket):
        """Add (or replace) ``ticket`` (a dict with at least uuid, size,
        url, timeout, ops)."""
        if not isinstance(ticket, dict) or "uuid" not in ticket:
            raise Error("Invalid ticket: expected an object with 'uuid'")
        self._request("PUT", _ticket_path(ticket["uuid"]), ticket)

    def get_ticket(self, ticket_id):
        """Return the ticket's information as a dict."""
        return self._request("GET", _ticket_path(ticket_id))

    def list_tickets(self):
        """Return the ids of all tickets."""
        return self._request("GET", "/tickets/")

    def mod_ticket(self, ticket_id, changes):
        """Change a ticket; ``changes`` is {"timeout": seconds}."""
        self._request("PATCH", _ticket_path(ticket_id), changes)

    def del_ticket(self, ticket_id):
        """Delete a ticket (succeeds if it does not exist)."""
        self._request("DELETE", _ticket_path(ticket_id))

    def close(self):
        self._con.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _request(self, method, path, body=None):
        headers = {}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        try:
            self._con.request(method, path, body=data, headers=headers)
            resp = self._con.getresponse()
            payload = resp.read()
        except (OSError, http.client.HTTPException) as e:
            self._con.close()
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise ConnectionFailed(
                "Cannot reach the imageio control service at {}: {} (is the "
                "daemon running with the same configuration?)".format(
                    self.address, reason))
        if resp.status >= 400:
            message = payload.decode("utf-8", "replace").strip() or \
                resp.reason
            cls = NotFound if resp.status == 404 else ServerError
            raise cls(resp.status, message)
        if payload and resp.getheader("Content-Type", "").startswith(
                "application/json"):
            return json.loads(payload)
        return None


def _ticket_path(ticket_id):
    """The control path of a ticket; the id is percent-encoded, so "/",
    "?", "%" or non-ASCII in an id reach the daemon as part of the id."""
    return "/tickets/" + urllib.parse.quote(str(ticket_id), safe="")
