"""Configuration: typed defaults and the INI drop-in loader.

The daemon reads ``CONFDIR/conf.d/*.conf`` in name order, later values
winning, with the same sections and options as the established
ovirt-imageio service.  An unknown section or option, or a value of the
wrong type, stops start-up with a message naming the file, section and
option.  Logging sections (``[loggers]``, ``[handler_*]``, ...) follow
``logging.config.fileConfig`` and are passed to it as they are.
"""

import configparser
import glob
import os

from . import errors

MiB = 1024**2

# section -> option -> default; the type of the default is the option's type.
DEFAULTS = {
    "daemon": {
        "poll_interval": 1.0,
        "max_connections": 8,
        "inactivity_timeout": 60,
        # Not in the established service: see docs/config.md.
        "max_clients": 10000,
        "header_timeout": 10,
        "max_buffer_memory": 768 * MiB,
        "run_dir": "/run/ovirt-imageio",
        "drop_privileges": True,
        "user_name": "ovirtimg",
        "group_name": "ovirtimg",
        "systemd_enable": True,
    },
    "tls": {
        "enable": True,
        "key_file": "",
        "cert_file": "",
        "ca_file": "",
        "enable_tls1_1": False,
        # Not in the established service: create a development CA and
        # localhost certificate at start-up when the files are missing.
        "create_dev_pki": False,
    },
    "backend_file": {
        "buffer_size": 8 * MiB,
    },
    "backend_http": {
        "buffer_size": 8 * MiB,
        "ca_file": "",
    },
    "backend_nbd": {
        "buffer_size": 8 * MiB,
    },
    "remote": {
        "host": "::",
        "port": 54322,
    },
    "local": {
        "enable": True,
        "socket": "\0/org/ovirt/imageio",
    },
    "control": {
        "enable": True,
        "transport": "unix",
        "socket": "/run/ovirt-imageio/sock",
        "port": -1,
        "prefer_ipv4": True,
        "remove_timeout": 60,
    },
    # Not in the established service: a plain-HTTP listener serving only
    # /metrics, for a Prometheus server (the control service serves it
    # too).  port -1: no listener; 0: any free port (logged).
    "metrics": {
        "host": "localhost",
        "port": -1,
    },
    # Not in the established service: tickets served over NBD (docs/nbd.md).
    # TCP on host:port (TLS required unless tls = false; port 0: any free
    # port), and a unix socket for clients on this host ("": none).
    "nbd": {
        "enable": False,
        "host": "::",
        "port": 10809,
        "socket": "",
        "tls": True,
    },
    "profile": {
        "filename": "/run/ovirt-imageio/profile",
    },
    # Logging, in logging.config.fileConfig format.  Sections named in
    # "keys" may be added freely; their options are not checked here.
    "loggers": {"keys": "root"},
    "handlers": {"keys": "logfile"},
    "formatters": {"keys": "long"},
    "logger_root": {"level": "INFO", "handlers": "logfile", "propagate": "0"},
    "handler_logfile": {
        "class": "logging.handlers.RotatingFileHandler",
        "args": '("/var/log/ovirt-imageio/daemon.log",)',
        "kwargs": '{"maxBytes": 20971520, "backupCount": 10}',
        "level": "DEBUG",
        "formatter": "long",
    },
    "handler_stderr": {
        "class": "logging.StreamHandler",
        "args": "()",
        "level": "DEBUG",
        "formatter": "long",
    },
    "formatter_long": {
        "format": "%(asctime)s %(levelname)-7s (%(threadName)s) "
                  "[%(name)s] %(message)s",
    },
}

LOGGING_PREFIXES = ("logger_", "handler_", "formatter_")
LOGGING_SECTIONS = ("loggers", "handlers", "formatters")

# Relative paths in these options are relative to the configuration
# directory (the parent of conf.d/), so a config dir works from any working
# directory and can be moved as a whole.
PATH_OPTIONS = {
    ("daemon", "run_dir"),
    ("tls", "key_file"),
    ("tls", "cert_file"),
    ("tls", "ca_file"),
    ("backend_http", "ca_file"),
    ("control", "socket"),
    ("local", "socket"),
    ("nbd", "socket"),
    ("profile", "filename"),
}

TRUE = {"1", "yes", "true", "on", "y"}
FALSE = {"0", "no", "false", "off", "n"}


class Section:
    """Options of one section as attributes."""

    def __init__(self, name, values):
        self._name = name
        self.__dict__.update(values)

    def __repr__(self):
        items = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        return "<Section {} {}>".format(self._name, items)


class Config:
    """The loaded configuration: ``cfg.daemon.max_connections`` etc."""

    def __init__(self, sections, files=()):
        self._sections = sections
        self.files = list(files)
        for name, values in sections.items():
            setattr(self, name, Section(name, values))

    def sections(self):
        return self._sections

    def logging_parser(self):
        """A ConfigParser holding only the logging sections."""
        p = configparser.RawConfigParser()
        for name, values in self._sections.items():
            if name in LOGGING_SECTIONS or name.startswith(LOGGING_PREFIXES):
                p.add_section(name)
                for k, v in values.items():
                    p.set(name, k, str(v))
        return p


def conf_files(confdir):
    """Drop-in files of ``confdir`` in the order they apply."""
    return sorted(glob.glob(os.path.join(confdir, "conf.d", "*.conf")))


def load(confdir=None, files=None):
    """Load the configuration of ``confdir`` (or explicit ``files``).

    Raises errors.ConfigError naming the file, section and option.
    """
    if files is None:
        if confdir and not os.path.isdir(confdir):
            raise errors.ConfigError(
                "Configuration directory {} does not exist (use -c to "
                "choose another)".format(confdir))
        files = conf_files(confdir) if confdir else []
    sections = {name: dict(values) for name, values in DEFAULTS.items()}
    for path in files:
        _apply_file(sections, path)
    _check(sections, files)
    return Config(sections, files)


def _check(sections, files):
    """Checks across options."""
    control = sections["control"]
    if control["enable"] and control["transport"] == "tcp" and \
            not 0 < control["port"] < 65536:
        raise errors.ConfigError(
            "{}: [control] transport = tcp needs [control] port set to a "
            "port number (got {}); clients find the daemon by it".format(
                ", ".join(files) or "defaults", control["port"]))
    if control["transport"] not in ("unix", "tcp"):
        raise errors.ConfigError(
            "{}: [control] transport = {!r}: expected 'unix' or 'tcp'"
            .format(", ".join(files) or "defaults", control["transport"]))


def _apply_file(sections, path):
    parser = configparser.RawConfigParser(
        delimiters=("=",), comment_prefixes=("#", ";"),
        inline_comment_prefixes=None, strict=True, interpolation=None)
    # Keep option names as written: logging's "class" and "keys" are lower
    # case anyway, and our options are too.
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f, source=path)
    except OSError as e:
        raise errors.ConfigError(
            "{}: cannot read configuration: {}".format(path, e.strerror))
    except configparser.Error as e:
        raise errors.ConfigError(
            "{}: invalid configuration: {}".format(path, _one_line(e)))

    base = os.path.dirname(os.path.abspath(path))
    if os.path.basename(base) == "conf.d":
        base = os.path.dirname(base)
    for name in parser.sections():
        is_logging = (name in LOGGING_SECTIONS
                      or name.startswith(LOGGING_PREFIXES))
        if name not in DEFAULTS and not is_logging:
            raise errors.ConfigError(
                "{}: unknown section [{}]; known sections: {}".format(
                    path, name, ", ".join(
                        s for s in DEFAULTS if s not in LOGGING_SECTIONS
                        and not s.startswith(LOGGING_PREFIXES))))
        target = sections.setdefault(name, {})
        for option, raw in parser.items(name):
            if is_logging:
                target[option] = raw
                continue
            if option not in DEFAULTS[name]:
                raise errors.ConfigError(
                    "{}: unknown option '{}' in section [{}]; known options: "
                    "{}".format(path, option, name,
                                ", ".join(DEFAULTS[name])))
            value = _convert(path, name, option, raw, DEFAULTS[name][option])
            if (name, option) in PATH_OPTIONS and value and \
                    not value.startswith(("/", "\0")):
                value = os.path.normpath(os.path.join(base, value))
            target[option] = value


def _convert(path, section, option, raw, default):
    value = raw.strip()
    where = "{}: [{}] {} = {!r}".format(path, section, option, raw)
    if isinstance(default, bool):
        lower = value.lower()
        if lower in TRUE:
            return True
        if lower in FALSE:
            return False
        raise errors.ConfigError(
            "{}: expected a boolean (true/false, yes/no, 1/0)".format(where))
    if isinstance(default, int):
        try:
            return int(value)
        except ValueError:
            raise errors.ConfigError("{}: expected an integer".format(where))
    if isinstance(default, float):
        try:
            return float(value)
        except ValueError:
            raise errors.ConfigError("{}: expected a number".format(where))
    # Strings: a socket name starting with a literal "\0" (as the established
    # service's default spells it) means an abstract unix socket.
    for prefix in ("\\0", "\\u0000"):
        if value.startswith(prefix):
            return "\0" + value[len(prefix):]
    return value


def _one_line(e):
    return " ".join(str(e).split())
