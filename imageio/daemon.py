"""ovirt-imageio: the daemon's main()."""

import argparse
import grp
import json
import logging
import logging.config
import os
import pwd
import resource
import signal
import socket
import sys
import threading

from . import __version__
from . import backends
from . import config
from . import errors
from . import metrics
from . import services
from . import tickets
from . import tls

log = logging.getLogger("daemon")

DEFAULT_CONFDIR = "/etc/ovirt-imageio"
# How long SIGTERM waits for running transfers before closing them.
STOP_TIMEOUT = 10


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="ovirt-imageio",
        description="Serve virtual machine disk images to ticket holders.")
    parser.add_argument(
        "-c", "--conf-dir", default=DEFAULT_CONFDIR,
        help="configuration directory holding conf.d/*.conf "
             "(default %(default)s)")
    parser.add_argument(
        "--show-config", action="store_true",
        help="print the effective configuration as JSON and exit (programs "
             "read the daemon's sockets from it)")
    parser.add_argument(
        "-t", "--ticket", action="append", default=[], metavar="FILE",
        help="add the ticket in FILE (JSON) at start-up; repeatable")
    parser.add_argument("--version", action="version", version=__version__)
    args = parser.parse_args(argv)
    try:
        cfg = config.load(args.conf_dir)
        if args.show_config:
            show_config(cfg)
            return 0
        setup_logging(cfg)
        daemon = Daemon(cfg)
        for path in args.ticket:
            daemon.add_ticket_file(path)
        daemon.start()
    except errors.ConfigError as e:
        print("ovirt-imageio: {}".format(e), file=sys.stderr)
        return 1
    except errors.BadRequest as e:
        print("ovirt-imageio: {}".format(e), file=sys.stderr)
        return 1
    except OSError as e:
        print("ovirt-imageio: cannot start: {}".format(e), file=sys.stderr)
        return 1
    daemon.wait()
    daemon.stop()
    return 0


def show_config(cfg):
    """Print the effective configuration, {section: {option: value}}, as
    the established daemon does."""
    print(json.dumps(cfg.sections(), indent=4, sort_keys=True))


def setup_logging(cfg):
    parser = cfg.logging_parser()
    try:
        logging.config.fileConfig(parser, disable_existing_loggers=False)
    except Exception as e:
        raise errors.ConfigError(
            "Invalid logging configuration: {}: {}".format(
                type(e).__name__, e))


def log_files():
    """Paths of the files logging writes to (file handlers of any kind)."""
    paths = set()
    for ref in logging._handlerList:
        handler = ref()
        if isinstance(handler, logging.FileHandler):
            paths.add(handler.baseFilename)
    return sorted(paths)


class Daemon:

    def __init__(self, cfg):
        self.cfg = cfg
        self.store = tickets.Store(cfg)
        metrics.track_tickets(self.store)
        self.services = []
        self._stop = threading.Event()
        self._created_paths = []

    def add_ticket_file(self, path):
        """Add the ticket in the JSON file ``path``; raise BadRequest
        naming the file when it cannot be read or is not a valid
        ticket."""
        try:
            with open(path, "rb") as f:
                ticket = json.load(f)
        except OSError as e:
            raise errors.BadRequest(
                "Cannot read ticket file {}: {}".format(path, e.strerror))
        except ValueError as e:
            raise errors.BadRequest(
                "Invalid ticket file {}: not JSON: {}".format(path, e))
        try:
            self.store.add(ticket)
        except errors.BadRequest as e:
            raise errors.BadRequest(
                "Invalid ticket file {}: {}".format(path, e.message))

    def start(self):
        cfg = self.cfg
        log.info("Starting ovirt-imageio %s (pid %d, config %s)",
                 __version__, os.getpid(), ", ".join(cfg.files) or "defaults")
        raise_fd_limit()
        ssl_context = None
        if cfg.tls.enable:
            if cfg.tls.create_dev_pki:
                tls.create_dev_pki(cfg.tls.key_file, cfg.tls.cert_file,
                                   cfg.tls.ca_file)
            ssl_context = tls.server_context(cfg)
        os.makedirs(cfg.daemon.run_dir, exist_ok=True)
        if cfg.control.enable and cfg.control.transport == "tcp":
            log.warning(
                "The control service uses TCP ([control] transport = tcp) "
                "without authentication: anyone on localhost can add "
                "tickets for any file the daemon can open; use the unix "
                "transport unless every local user is trusted")

        self.services = services.create(cfg, self.store, ssl_context)
        for path in (cfg.local.socket if cfg.local.enable else "",
                     cfg.control.socket if cfg.control.enable
                     and cfg.control.transport == "unix" else "",
                     cfg.nbd.socket if cfg.nbd.enable else ""):
            if path and not path.startswith("\0"):
                self._created_paths.append(path)

        if os.geteuid() == 0 and cfg.daemon.drop_privileges:
            # Every backend's modules are loaded while root: the daemon
            # user may not read the Python installation's extension
            # modules (a Python under /root), and a backend imported on a
            # ticket's first request would fail there.
            backends.load_all()
            self._drop_privileges()

        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

        for service in self.services:
            service.start()
            log.info("Listening %s service on %s", service.name,
                     services.describe(service))
        if cfg.daemon.systemd_enable:
            notify_systemd("READY=1\nSTATUS=Serving")
        log.info("Ready")

    def _drop_privileges(self):
        cfg = self.cfg.daemon
        try:
            user = pwd.getpwnam(cfg.user_name)
            group = grp.getgrnam(cfg.group_name)
        except KeyError as e:
            raise errors.ConfigError(
                "Cannot drop privileges: {} (create the user and group, or "
                "set [daemon] drop_privileges = false)".format(e))
        # Sockets and the run dir were created as root: hand them over so
        # the daemon's group can reach the control socket (mode 0660).
        for path in self._created_paths + [cfg.run_dir]:
            os.chown(path, user.pw_uid, group.gr_gid)
        # Log files were opened as root: the daemon user must be able to
        # rotate them (rename the old ones, create a new one), or the first
        # rotation fails and logging stops.  The log directory goes too
        # when it holds only these logs (systemd's LogsDirectory= is
        # created root's when the unit has no User=); a shared directory
        # is left alone (a warning follows below).
        for path in log_files():
            os.chown(path, user.pw_uid, group.gr_gid)
            parent = os.path.dirname(path)
            base = os.path.basename(path)
            if all(name.startswith(base) for name in os.listdir(parent)):
                os.chown(parent, user.pw_uid, group.gr_gid)
            for name in os.listdir(parent):
                if name.startswith(base + "."):
                    os.chown(os.path.join(parent, name), user.pw_uid,
                             group.gr_gid)
        # initgroups, as the established daemon does: the daemon user's
        # supplementary groups grant access to images and NBD sockets.
        os.initgroups(cfg.user_name, group.gr_gid)
        os.setgid(group.gr_gid)
        os.setuid(user.pw_uid)
        log.info("Dropped privileges to %s:%s", cfg.user_name,
                 cfg.group_name)
        for path in log_files():
            if not os.access(os.path.dirname(path), os.W_OK):
                log.warning("The directory of log file %s is not writable "
                            "by %s: rotating the log will fail", path,
                            cfg.user_name)

    def _on_signal(self, signo, frame):
        log.info("Received signal %d, stopping", signo)
        self._stop.set()

    def wait(self):
        while not self._stop.wait(1.0):
            pass

    def stop(self):
        if self.cfg.daemon.systemd_enable:
            notify_systemd("STOPPING=1")
        # Cancel transfers first so running operations stop at their next
        # chunk, then close all connections.  Tickets are canceled together
        # so stopping takes STOP_TIMEOUT at most, however many there are.
        def cancel(ticket_id):
            try:
                self.store.remove(ticket_id, timeout=STOP_TIMEOUT)
            except errors.Error as e:
                log.warning("Stopping: %s", e)

        workers = [threading.Thread(target=cancel, args=(ticket_id,),
                                    daemon=True)
                   for ticket_id in self.store.ids()]
        for t in workers:
            t.start()
        for t in workers:
            t.join(STOP_TIMEOUT + 1)
        for service in self.services:
            service.stop()
        for service in self.services:
            left = service.wait_connections(STOP_TIMEOUT)
            if left:
                log.warning("%s: %d connections still open at exit",
                            service.name, left)
        for path in self._created_paths:
            try:
                os.unlink(path)
            except OSError:
                pass
        log.info("Stopped")


def raise_fd_limit():
    """Raise the soft RLIMIT_NOFILE to the hard limit: every connection
    costs a file descriptor, and the usual soft limit (1024) is far below
    what the hard limit (and [daemon] max_clients) allow."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard
        if hard == resource.RLIM_INFINITY:
            # Not settable as a soft limit on Linux: the kernel's maximum.
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("Cannot raise the file descriptor limit from %d to "
                        "%d: %s", soft, target, e)
    log.info("File descriptor limit: %d", soft)


def notify_systemd(state):
    """Send ``state`` to systemd's $NOTIFY_SOCKET, if set."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(state.encode("utf-8"))
    except OSError as e:
        log.warning("Cannot notify systemd: %s", e)


if __name__ == "__main__":
    sys.exit(main())
