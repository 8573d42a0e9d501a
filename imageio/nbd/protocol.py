"""The NBD protocol (NetworkBlockDevice/nbd doc/proto.md), the server's
side, as pure functions over bytes: parsing the client's handshake and
requests, building the server's replies.  No sockets here: every function
can be tested and fuzzed on its own.  Malformed input raises
``ProtocolError``; the server answers or closes (imageio.nbd.server).
"""

import struct

# Handshake.
NBDMAGIC = 0x4e42444d41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT"
REPLY_MAGIC = 0x3e889045565a9

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
C_FLAG_FIXED_NEWSTYLE = 1 << 0
C_FLAG_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = 2**31 + 1
REP_ERR_POLICY = 2**31 + 2
REP_ERR_INVALID = 2**31 + 3
REP_ERR_TLS_REQD = 2**31 + 5
REP_ERR_UNKNOWN = 2**31 + 6
REP_ERR_TOO_BIG = 2**31 + 9

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

# Transmission flags.
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

# Requests.
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668e33ef

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# The flags each command accepts.
CMD_FLAGS = {
    CMD_READ: CMD_FLAG_DF,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_DISC: 0,
    CMD_FLUSH: 0,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_CACHE: 0,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    CMD_BLOCK_STATUS: CMD_FLAG_REQ_ONE,
}

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = 2**15 + 1

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
STATE_DIRTY = 1 << 0

# Errors (proto.md: the Linux values).
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

OPTION_HEADER = struct.Struct(">QII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
STRUCTURED_REPLY = struct.Struct(">IHHQI")

# Longest option data accepted (an export name is at most 4 KiB).
MAX_OPTION = 64 * 1024
MAX_NAME = 4096

BASE_ALLOCATION = "base:allocation"
DIRTY_BITMAP = "qemu:dirty-bitmap:"


class ProtocolError(Exception):
    """The client broke the protocol: the connection cannot go on."""


def greeting():
    """The fixed newstyle greeting the server sends first."""
    return struct.pack(">QQH", NBDMAGIC, IHAVEOPT,
                       FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)


def parse_client_flags(data):
    """The client's 4 flag bytes: (no_zeroes)."""
    (flags,) = struct.unpack(">I", data)
    if not flags & C_FLAG_FIXED_NEWSTYLE:
        raise ProtocolError("client does not speak fixed newstyle")
    if flags & ~(C_FLAG_FIXED_NEWSTYLE | C_FLAG_NO_ZEROES):
        raise ProtocolError("unknown client flags {:#x}".format(flags))
    return bool(flags & C_FLAG_NO_ZEROES)


def parse_option_header(data):
    """(option, length) of a 16-byte option header."""
    magic, option, length = OPTION_HEADER.unpack(data)
    if magic != IHAVEOPT:
        raise ProtocolError("bad option magic {:#x}".format(magic))
    if length > MAX_OPTION:
        raise ProtocolError("option data of {} bytes".format(length))
    return option, length


def option_reply(option, reply, data=b""):
    return struct.pack(">QIII", REPLY_MAGIC, option, reply, len(data)) + data


def option_error(option, reply, message):
    return option_reply(option, reply, message.encode("utf-8")[:4096])


def parse_info_request(data):
    """NBD_OPT_INFO/GO data: (export name, [info types])."""
    if len(data) < 6:
        raise ValueError("option data too short")
    (n,) = struct.unpack_from(">I", data)
    if n > MAX_NAME or 4 + n + 2 > len(data):
        raise ValueError("bad export name length")
    name = data[4:4 + n].decode("utf-8")
    (count,) = struct.unpack_from(">H", data, 4 + n)
    if len(data) != 4 + n + 2 + 2 * count:
        raise ValueError("bad information request count")
    infos = list(struct.unpack_from(">{}H".format(count), data, 6 + n))
    return name, infos


def info_export(size, flags):
    return struct.pack(">HQH", INFO_EXPORT, size, flags)


def info_block_size(minimum, preferred, maximum):
    return struct.pack(">HIII", INFO_BLOCK_SIZE, minimum, preferred, maximum)


def export_name_reply(size, flags, no_zeroes):
    """The reply to NBD_OPT_EXPORT_NAME (no option reply header)."""
    return struct.pack(">QH", size, flags) + (b"" if no_zeroes
                                              else bytes(124))


def parse_meta_context_request(data):
    """LIST/SET_META_CONTEXT data: (export name, [queries])."""
    if len(data) < 8:
        raise ValueError("option data too short")
    (n,) = struct.unpack_from(">I", data)
    if n > MAX_NAME or 4 + n + 4 > len(data):
        raise ValueError("bad export name length")
    name = data[4:4 + n].decode("utf-8")
    pos = 4 + n
    (count,) = struct.unpack_from(">I", data, pos)
    pos += 4
    queries = []
    for _ in range(count):
        if pos + 4 > len(data):
            raise ValueError("truncated query")
        (qlen,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if pos + qlen > len(data):
            raise ValueError("truncated query")
        queries.append(data[pos:pos + qlen].decode("utf-8"))
        pos += qlen
    if pos != len(data):
        raise ValueError("trailing bytes")
    return name, queries


def meta_context_reply(option, context_id, name):
    return option_reply(option, REP_META_CONTEXT,
                        struct.pack(">I", context_id) + name.encode("utf-8"))


def parse_request(data):
    """(flags, type, cookie, offset, length) of a 28-byte request."""
    magic, flags, kind, cookie, offset, length = REQUEST.unpack(data)
    if magic != REQUEST_MAGIC:
        raise ProtocolError("bad request magic {:#x}".format(magic))
    return flags, kind, cookie, offset, length


def simple_reply(cookie, error=0):
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def structured_reply(cookie, kind, payload=b"", done=True):
    return STRUCTURED_REPLY.pack(
        STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, kind, cookie,
        len(payload)) + payload


def data_chunk_header(cookie, offset, length, done):
    """The header of an OFFSET_DATA chunk of ``length`` data bytes (the
    data follows)."""
    return STRUCTURED_REPLY.pack(
        STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0,
        REPLY_TYPE_OFFSET_DATA, cookie, 8 + length) + struct.pack(">Q",
                                                                  offset)


def hole_chunk(cookie, offset, length, done):
    return structured_reply(cookie, REPLY_TYPE_OFFSET_HOLE,
                            struct.pack(">QI", offset, length), done)


def error_chunk(cookie, error, message=""):
    text = message.encode("utf-8")[:4096]
    return structured_reply(cookie, REPLY_TYPE_ERROR,
                            struct.pack(">IH", error, len(text)) + text)


def block_status_chunk(cookie, context_id, descriptors, done=True):
    """``descriptors``: (length, flags) pairs."""
    payload = struct.pack(">I", context_id) + b"".join(
        struct.pack(">II", length, flags) for length, flags in descriptors)
    return structured_reply(cookie, REPLY_TYPE_BLOCK_STATUS, payload, done)
