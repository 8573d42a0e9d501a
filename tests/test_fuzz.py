"""Run the atheris fuzz target for the HTTP parser for a bounded time."""

import os
import subprocess
import sys

SEEDS = [
    b"GET /images/abc HTTP/1.1\r\nHost: x\r\nRange: bytes=0-99\r\n\r\n",
    b"PUT /images/abc?flush=n HTTP/1.1\r\nContent-Length: 5\r\n"
    b"Content-Range: bytes 0-4/*\r\n\r\nhello",
    b"PUT /images/abc HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    b"PATCH /images/abc HTTP/1.1\r\nContent-Length: 15\r\n\r\n"
    b'{"op": "flush"}',
    b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /x HTTP/1.1\r\n\r\n",
]


def test_fuzz_http_parser(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(SEEDS):
        (corpus / "seed{}".format(i)).write_bytes(seed)
    target = os.path.join(os.path.dirname(__file__), "fuzz_http.py")
    r = subprocess.run(
        [sys.executable, target, "-max_total_time=30", "-timeout=20",
         "-artifact_prefix={}/".format(tmp_path), str(corpus)],
        capture_output=True, text=True, timeout=300)
    tail = r.stderr[-3000:]
    assert r.returncode == 0, tail
    assert "Done" in tail
