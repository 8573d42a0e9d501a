"""imageio.urls: which backend serves a ticket URL, and the URL forms
each accepts (SPEC section 4)."""

import pytest

from imageio import errors
from imageio import urls


@pytest.mark.parametrize("url,kind,attrs", [
    ("nbd:unix:/run/x.sock", "unix", {"path": "/run/x.sock", "export": ""}),
    ("nbd:unix:/run/x.sock:exportname=sda", "unix",
     {"path": "/run/x.sock", "export": "sda"}),
    ("nbd:unix:/run/x.sock:exportname=a:b", "unix",
     {"path": "/run/x.sock", "export": "a:b"}),
    ("nbd:localhost:10809", "tcp",
     {"host": "localhost", "port": 10809, "export": ""}),
    ("nbd:localhost:10809:exportname=sda", "tcp",
     {"host": "localhost", "port": 10809, "export": "sda"}),
    ("nbd:localhost:10809:exportname=x:1", "tcp",
     {"host": "localhost", "port": 10809, "export": "x:1"}),
    ("nbd:[::1]:10809:exportname=sda", "tcp",
     {"host": "::1", "port": 10809, "export": "sda"}),
    ("nbd:::1:10809", "tcp", {"host": "::1", "port": 10809}),
    ("nbd://localhost:10809/sda", "uri", {"export": "sda"}),
    ("nbd://localhost/sda", "uri", {"export": "sda"}),
    ("nbd://localhost", "uri", {"export": ""}),
    ("nbd+unix:///sda?socket=/run/x.sock", "uri", {"export": "sda"}),
    ("nbd+unix:///?socket=/run/x.sock", "uri", {"export": ""}),
    ("nbds://localhost:10809/sda?tls-certificates=/pki", "uri",
     {"export": "sda"}),
    ("nbds+unix://alice@/sda?socket=/s&tls-psk-file=/k", "uri",
     {"export": "sda", "tls_username": None}),
    ("nbds+unix:///sda?socket=/s&tls-psk-file=/k&tls-username=bob", "uri",
     {"export": "sda", "tls_username": "bob"}),
])
def test_parse_url(url, kind, attrs):
    address = urls.parse_nbd_url(url)
    assert address.kind == kind
    for name, value in attrs.items():
        assert getattr(address, name) == value
    urls.validate(url)


@pytest.mark.parametrize("url", [
    "nbd:",
    "nbd:unix:",
    "nbd:unix:relative.sock",
    "nbd:localhost",
    "nbd:localhost:port",
    "nbd://",
    "nbd://localhost:port/x",
    "nbd+unix:///sda",
    "nbd+unix://host/sda?socket=/s",
    "nbd+unix:///sda?socket=/a&socket=/b",
    "nbd://localhost/sda?socket=/s",
    "nbds+unix:///x",
])
def test_parse_url_invalid(url):
    with pytest.raises(errors.BadRequest) as e:
        urls.validate(url)
    assert "NBD url" in str(e.value) or "url" in str(e.value)


@pytest.mark.parametrize("url,kind", [
    ("file:///var/tmp/x", "file"), ("nbd:unix:/s", "nbd"),
    ("nbds+unix:///x?socket=/s", "nbd"), ("https://h:1/images/x", "http"),
    ("ftp://h/x", None)])
def test_scheme_of(url, kind):
    assert urls.scheme_of(url) == kind


@pytest.mark.parametrize("url", [
    "ftp://h/x", "file:relative", "https://h/other/x", "https://h/images/",
    "http://h/images/x"])
def test_validate_refuses(url):
    with pytest.raises(errors.BadRequest) as e:
        urls.validate(url)
    assert "url" in str(e.value)


def test_file_url_path():
    assert urls.parse_file_url("file:///var/tmp/a%20b") == "/var/tmp/a b"
