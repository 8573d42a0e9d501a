"""What logs and messages may show of secrets: a ticket id is the secret
that grants access to an image, and NBD URLs may carry passwords and keys.
A leaf module.
"""

import urllib.parse


def short_id(ticket_id):
    """The part of a ticket id safe to log: logs are read by more people
    than the control socket, and the id is the secret."""
    return ticket_id[:8] + "..." if len(ticket_id) > 8 else ticket_id


# Query parameters whose values are shown in messages: paths and names, not
# secrets (a PSK file's path is not its key).
_PUBLIC_PARAMS = {"socket", "tls-certificates", "tls-psk-file",
                  "tls-username"}


def url(url):
    """``url`` fit for messages and logs: no password, no secret query values."""
    if "://" not in url:
        # Legacy nbd:unix:/path and nbd:host:port forms carry no secrets.
        return url
    try:
        u = urllib.parse.urlsplit(url)
    except ValueError:
        return "<invalid url>"
    netloc = u.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = "{}@{}".format(user, hostport)
    if u.query:
        params = []
        for key, value in urllib.parse.parse_qsl(u.query,
                                                 keep_blank_values=True):
            if key not in _PUBLIC_PARAMS:
                value = "***"
            params.append("{}={}".format(key, value))
        query = "&".join(params)
    else:
        query = ""
    # Not urlunsplit(): it drops the "//" of "nbd+unix:///".
    out = "{}://{}{}".format(u.scheme, netloc, u.path)
    if query:
        out += "?" + query
    return out
