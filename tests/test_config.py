import os

import pytest

from imageio import config
from imageio import errors


def write(confdir, name, text):
    d = confdir / "conf.d"
    d.mkdir(exist_ok=True)
    (d / name).write_text(text)
    return str(d / name)


def test_defaults_match_established_service():
    cfg = config.load(files=[])
    assert cfg.daemon.max_connections == 8
    assert cfg.daemon.inactivity_timeout == 60
    assert cfg.daemon.poll_interval == 1.0
    assert cfg.daemon.drop_privileges is True
    assert cfg.daemon.user_name == "ovirtimg"
    assert cfg.tls.enable is True
    assert cfg.tls.enable_tls1_1 is False
    assert cfg.backend_file.buffer_size == 8 * 1024**2
    assert cfg.remote.host == "::"
    assert cfg.remote.port == 54322
    assert cfg.local.socket == "\0/org/ovirt/imageio"
    assert cfg.control.transport == "unix"
    assert cfg.control.socket == "/run/ovirt-imageio/sock"
    assert cfg.control.remove_timeout == 60


def test_drop_ins_in_name_order_later_wins(tmp_path):
    write(tmp_path, "50-vdsm.conf", "[remote]\nport = 1000\n"
          "[daemon]\nmax_connections = 4\n")
    write(tmp_path, "99-local.conf", "[remote]\nport = 2000\n")
    write(tmp_path, "10-first.conf", "[remote]\nport = 3000\nhost = ::1\n")
    cfg = config.load(str(tmp_path))
    assert cfg.remote.port == 2000
    assert cfg.remote.host == "::1"
    assert cfg.daemon.max_connections == 4


def test_only_conf_files_are_read(tmp_path):
    write(tmp_path, "50-a.conf.rpmsave", "[remote]\nport = 1\n")
    cfg = config.load(str(tmp_path))
    assert cfg.remote.port == 54322


def test_established_vdsm_conf_is_accepted(tmp_path):
    # The options vdsm and the engine write.
    write(tmp_path, "50-vdsm.conf", """\
[daemon]
user_name = vdsm
group_name = kvm
max_connections = 8

[tls]
enable = true
key_file = /etc/pki/vdsm/keys/vdsmkey.pem
cert_file = /etc/pki/vdsm/certs/vdsmcert.pem
ca_file = /etc/pki/vdsm/certs/cacert.pem

[backend_file]
buffer_size = 8388608

[backend_nbd]
buffer_size = 8388608

[remote]
port = 54322

[local]
enable = true

[control]
transport = unix
""")
    cfg = config.load(str(tmp_path))
    assert cfg.daemon.user_name == "vdsm"
    assert cfg.tls.key_file == "/etc/pki/vdsm/keys/vdsmkey.pem"


@pytest.mark.parametrize("text,words", [
    ("[nosuch]\nx = 1\n", ["[nosuch]"]),
    ("[daemon]\nmax_conections = 8\n", ["max_conections", "[daemon]"]),
    ("[daemon]\nmax_connections = many\n",
     ["[daemon] max_connections", "integer"]),
    ("[tls]\nenable = maybe\n", ["[tls] enable", "boolean"]),
    ("[daemon]\npoll_interval = soon\n", ["poll_interval", "number"]),
    ("[daemon\nx=1\n", ["invalid configuration"]),
])
def test_errors_name_file_section_option(tmp_path, text, words):
    path = write(tmp_path, "50-bad.conf", text)
    with pytest.raises(errors.ConfigError) as e:
        config.load(str(tmp_path))
    msg = str(e.value)
    assert path in msg
    for word in words:
        assert word in msg


@pytest.mark.parametrize("raw,value", [
    ("true", True), ("yes", True), ("1", True), ("on", True),
    ("false", False), ("no", False), ("0", False), ("off", False),
])
def test_booleans(tmp_path, raw, value):
    write(tmp_path, "50.conf", "[local]\nenable = {}\n".format(raw))
    assert config.load(str(tmp_path)).local.enable is value


def test_relative_paths_are_relative_to_confdir(tmp_path):
    write(tmp_path, "50.conf", "[tls]\nkey_file = pki/key.pem\n"
          "[control]\nsocket = run/sock\n[daemon]\nrun_dir = run\n")
    cfg = config.load(str(tmp_path))
    assert cfg.tls.key_file == os.path.join(str(tmp_path), "pki/key.pem")
    assert cfg.control.socket == os.path.join(str(tmp_path), "run/sock")
    assert cfg.daemon.run_dir == os.path.join(str(tmp_path), "run")


def test_abstract_socket_spelling(tmp_path):
    write(tmp_path, "50.conf", "[local]\nsocket = \\0/my/socket\n")
    assert config.load(str(tmp_path)).local.socket == "\0/my/socket"


def test_logging_sections_pass_through(tmp_path):
    write(tmp_path, "50.conf", """\
[handlers]
keys = stderr, syslog

[handler_syslog]
class = logging.handlers.SysLogHandler
args = ()
level = INFO
formatter = long

[logger_root]
handlers = stderr
""")
    cfg = config.load(str(tmp_path))
    p = cfg.logging_parser()
    assert p.get("handler_syslog", "class") == \
        "logging.handlers.SysLogHandler"
    assert p.get("handlers", "keys") == "stderr, syslog"
    assert p.get("logger_root", "level") == "INFO"


def test_missing_confdir(tmp_path):
    with pytest.raises(errors.ConfigError) as e:
        config.load(str(tmp_path / "nosuch"))
    assert "does not exist" in str(e.value)


def test_tcp_control_needs_port(tmp_path):
    write(tmp_path, "50.conf", "[control]\ntransport = tcp\n")
    with pytest.raises(errors.ConfigError) as e:
        config.load(str(tmp_path))
    assert "[control] port" in str(e.value)


def test_bad_control_transport(tmp_path):
    write(tmp_path, "50.conf", "[control]\ntransport = pigeon\n")
    with pytest.raises(errors.ConfigError) as e:
        config.load(str(tmp_path))
    assert "pigeon" in str(e.value)
