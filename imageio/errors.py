"""The one error hierarchy.

Errors that carry an HTTP status are raised where the condition is found
and turned into a response in one place (``imageio.http``).  Anything else
escaping a handler becomes ``500``.
"""


class Error(Exception):
    """Base of all imageio errors."""

    status = 500

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


class InsufficientStorage(HTTPError):
    """Insufficient storage."""
    status = 507


class ConfigError(Error):
    """Invalid configuration."""


class Canceled(Error):
    """The operation was canceled because its ticket was deleted or expired."""
    status = 403


class PartialContent(Error):
    """The client sent fewer bytes than it announced."""
    status = 400

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
