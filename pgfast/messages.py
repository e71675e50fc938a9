"""The few backend messages pgfast writes itself (everything else is relayed).

Built once per connection at most, so plain Python is the right tool here.
"""
import struct

from ._framing import pack_int32

AUTHENTICATION_OK = b"R" + pack_int32(8) + pack_int32(0)
READY_IDLE = b"Z" + pack_int32(5) + b"I"
SSL_ACCEPT = b"S"
SSL_REFUSE = b"N"


def message(msg_type: bytes, payload: bytes) -> bytes:
    return msg_type + pack_int32(len(payload) + 4) + payload


def _fields(severity: str, sqlstate: str, text: str, detail: str | None, hint: str | None) -> bytes:
    parts = [b"S", severity.encode(), b"\0", b"V", severity.encode(), b"\0",
             b"C", sqlstate.encode(), b"\0", b"M", text.encode("utf-8", "surrogateescape"), b"\0"]
    if detail:
        parts += [b"D", detail.encode("utf-8", "surrogateescape"), b"\0"]
    if hint:
        parts += [b"H", hint.encode("utf-8", "surrogateescape"), b"\0"]
    parts.append(b"\0")
    return b"".join(parts)


def error(sqlstate: str, text: str, detail: str | None = None, hint: str | None = None,
          severity: str = "FATAL") -> bytes:
    return message(b"E", _fields(severity, sqlstate, text, detail, hint))


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", name.encode("utf-8", "surrogateescape") + b"\0" + value.encode("utf-8", "surrogateescape") + b"\0")


def backend_key_data(pid: int, key: bytes) -> bytes:
    return message(b"K", struct.pack("!i", pid) + key)


def negotiate_protocol_version(minor: int, unrecognized: list[str]) -> bytes:
    """As PostgreSQL sends it: the whole version (3.minor) it will speak, though the
    protocol documentation speaks of the minor version alone, and libpq reads it so."""
    names = b"".join(n.encode("utf-8", "surrogateescape") + b"\0" for n in unrecognized)
    return message(b"v", struct.pack("!ii", (3 << 16) | minor, len(unrecognized)) + names)


def startup_message(params: list[tuple[str, str]]) -> bytes:
    body = b"".join(k.encode("utf-8", "surrogateescape") + b"\0" + v.encode("utf-8", "surrogateescape") + b"\0"
                    for k, v in params)
    return pack_int32(len(body) + 9) + pack_int32(196608) + body + b"\0"


def cancel_request(pid: int, key: int) -> bytes:
    return struct.pack("!iiiI", 16, 80877102, pid, key)


def parse_error_fields(payload: bytes) -> dict[str, str]:
    """ErrorResponse/NoticeResponse payload -> {field code: text}."""
    fields = {}
    for part in payload.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


# --- result sets (the admin console answers its queries itself) -------------------------

_INT8_OID, _TEXT_OID = 20, 25


def row_description(columns: list[tuple[str, bool]]) -> bytes:
    """RowDescription for (name, is_integer) columns, every one in text format."""
    fields = [struct.pack("!h", len(columns))]
    for name, integer in columns:
        fields.append(name.encode() + b"\0" + struct.pack("!ihihih", 0, 0, _INT8_OID if integer else _TEXT_OID,
                                                          8 if integer else -1, -1, 0))
    return message(b"T", b"".join(fields))


def data_row(values: list[object]) -> bytes:
    parts = [struct.pack("!h", len(values))]
    for value in values:
        if value is None:
            parts.append(struct.pack("!i", -1))
        else:
            encoded = str(value).encode("utf-8", "surrogateescape")
            parts.append(struct.pack("!i", len(encoded)) + encoded)
    return message(b"D", b"".join(parts))


def command_complete(tag: str) -> bytes:
    return message(b"C", tag.encode() + b"\0")


def parse_data_row(payload: bytes) -> tuple[str | None, ...]:
    """A DataRow's values as text (None for NULL)."""
    (count,) = struct.unpack_from("!h", payload)
    offset, values = 2, []
    for _ in range(count):
        (length,) = struct.unpack_from("!i", payload, offset)
        offset += 4
        if length < 0:
            values.append(None)
            continue
        values.append(payload[offset:offset + length].decode("utf-8", "surrogateescape"))
        offset += length
    return tuple(values)
