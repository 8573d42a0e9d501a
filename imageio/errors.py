"""The one error hierarchy.

Errors that carry an HTTP status are raised where the condition is found
and turned into a response in one place (``imageio.http``).  Anything else
escaping a handler becomes ``500``.

What an error does to the connection is a class attribute, read by that
one place and by the client, never set on an instance:

``close``
    The server closes the connection after answering (the rest of the
    request body cannot be found, or SPEC says close).
``retriable``
    The request may go again on a new connection (the client retries it):
    the remote failed or could not be reached, its answer may differ next
    time.
"""


class Error(Exception):
    """Base of all imageio errors."""

    status = 500
    close = False
    retriable = False

    def __init__(self, message=None):
        super().__init__(message or self.__class__.__doc__.strip())

    @property
    def message(self):
        return str(self.args[0])


class HTTPError(Error):
    """Request failed."""


class BadRequest(HTTPError):
    """Bad request."""
    status = 400


class Forbidden(HTTPError):
    """Forbidden."""
    status = 403
    # SPEC: a refused request closes its connection.
    close = True


class NotFound(HTTPError):
    """Not found."""
    status = 404


class MethodNotAllowed(HTTPError):
    """Method not allowed."""
    status = 405


class Conflict(HTTPError):
    """Conflict."""
    status = 409


class LengthRequired(HTTPError):
    """Length required."""
    status = 411
    close = True


class PayloadTooLarge(HTTPError):
    """Payload too large."""
    status = 413


class UnsupportedMediaType(HTTPError):
    """A request body in a content coding the server does not decode."""
    status = 415


class HeadersTooLarge(HTTPError):
    """Request header fields too large."""
    status = 431


class ServiceUnavailable(HTTPError):
    """Service unavailable."""
    status = 503


class RangeNotSatisfiable(HTTPError):
    """Requested range not satisfiable."""
    status = 416

    def __init__(self, message=None, size=None):
        super().__init__(message)
        # Reported as "Content-Range: bytes */size" when known.
        self.size = size


class InternalError(HTTPError):
    """Internal server error."""
    status = 500


class BadGateway(HTTPError):
    """Bad gateway."""
    status = 502


class RemoteFailed(BadGateway):
    """The remote daemon failed or could not be reached; the request may
    go again on a new connection."""
    retriable = True


class InsufficientStorage(HTTPError):
    """Insufficient storage."""
    status = 507


class ConfigError(Error):
    """Invalid configuration."""


class Canceled(Error):
    """The operation was canceled because its ticket was deleted or expired."""
    status = 403
    close = True


class PartialContent(Error):
    """The client sent fewer bytes than it announced."""
    status = 400
    close = True

    def __init__(self, requested, received):
        super().__init__(
            "Body too short: expected {} bytes, received {}".format(
                requested, received))
        self.requested = requested
        self.received = received


class BackendError(Error):
    """A backend operation failed (I/O error, NBD error, remote failure)."""
    status = 500


class ClientDisconnected(Error):
    """The client went away; nothing can be answered."""
