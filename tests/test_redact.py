"""imageio.redact: what logs and messages may show of secrets."""

from imageio import redact


def test_redact():
    url = ("nbds+unix://alice:secret@/x?socket=/s&tls-psk-file=/keys.psk"
           "&tls-certificates=/pki&token=abc")
    r = redact.url(url)
    assert "secret" not in r
    assert "abc" not in r
    assert "tls-psk-file=/keys.psk" in r
    assert "socket=/s" in r
    assert "tls-certificates=/pki" in r
    assert "alice" in r
    assert r.startswith("nbds+unix://alice@/x?")
    assert redact.url("nbd+unix:///x?socket=/s") == \
        "nbd+unix:///x?socket=/s"
    assert redact.url("nbd:unix:/s:exportname=x") == \
        "nbd:unix:/s:exportname=x"


def test_short_id_hides_secret():
    assert redact.short_id("0123456789abcdef") == "01234567..."
