"""The one test and benchmark harness: real processes and real clients.

- ``daemonproc``: the daemon as a process on a config dir of its own.
- ``nbdserver``: qemu-nbd and nbdkit servers, images (qemu-img, qemu-io),
  TLS credentials and PSK files.
- ``promserver``: a real Prometheus server scraping the daemon.
- ``net``: free ports, http.client over unix sockets, raw HTTP exchange.

tests/ and bench/ import it as a package (``from harness import
nbdserver``); nothing reaches into tests/ through sys.path.
"""
