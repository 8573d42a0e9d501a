"""/info/: the daemon's version."""

from .. import __version__


class Info:

    def get(self, req, resp):
        resp.send_json({"version": __version__})
