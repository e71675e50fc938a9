"""pg_hosts.conf: the TLS configuration per server name (SNI), read as PostgreSQL 19 reads it.

    load_hosts(path) -> list[HostsLine] | None
        None when the file is missing or holds no entry (postgresql.conf's certificate then
        serves every connection); raises TLSSetupError with PostgreSQL's words when a line is
        wrong, holding the LOG line PostgreSQL writes for each bad line (its `preceding`).

A line is `HOSTNAMES CERTIFICATE KEY [CA [PASSPHRASE_COMMAND [PASSPHRASE_COMMAND_RELOAD]]]`,
tokenized like pg_hba.conf (quotes, comma lists, @file inclusion). HOSTNAMES is a comma list of
names matched against the client's server name without regard to case, `*` (every name no other
line has, and clients without SNI when no `/no_sni/` line exists) or `/no_sni/` (clients that
send no server name); the two special entries stand alone on their line and once in the file.
A port of be-secure-common.c's parse_hosts_line/load_hosts and the checks be_tls_init makes.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from .hba import LineError, Token, read_text, tokenize
from .errors import TLSSetupError

DEFAULT_HOST = "*"
NO_SNI = "/no_sni/"
_TRUE = ("on", "true", "yes", "1")
_FALSE = ("off", "false", "no", "0")


@dataclass(frozen=True)
class HostsLine:
    hostnames: tuple[str, ...]          # as written; ('*',) or ('/no_sni/',) for the special entries
    ssl_cert: str
    ssl_key: str
    ssl_ca: str | None
    passphrase_command: str
    passphrase_command_reload: bool
    line_no: int

    @property
    def special(self) -> str | None:
        return self.hostnames[0] if self.hostnames[0] in (DEFAULT_HOST, NO_SNI) else None


class _BadLine(Exception):
    """A line PostgreSQL refuses; the caller logs it with its place."""


def _one(field: list[Token] | None, what: str) -> str:
    if field is None:
        raise _BadLine("missing entry at end of line")
    if len(field) > 1:
        raise _BadLine(f"multiple values specified for {what}")
    return field[0].string


def _parse_bool(text: str) -> bool | None:
    """PostgreSQL's parse_bool: 1/0 or an unambiguous prefix of on/off/true/false/yes/no."""
    lowered = text.lower()
    if lowered in ("", "o"):
        return None
    if any(word.startswith(lowered) for word in _TRUE):
        return True
    if any(word.startswith(lowered) for word in _FALSE):
        return False
    return None


def _parse_line(fields: list[list[Token]], line_no: int) -> HostsLine:
    names = tuple(token.string for token in fields[0])
    if len(names) > 1 and (DEFAULT_HOST in names or NO_SNI in names):
        raise _BadLine("default and non-SNI entries cannot be mixed with other entries")
    rest = iter(fields[1:])
    cert = _one(next(rest, None), "SSL certificate")
    key = _one(next(rest, None), "SSL key")
    ca_field = next(rest, None)
    ca = _one(ca_field, "SSL CA") if ca_field is not None else None
    command, reload = "", False
    command_field = next(rest, None)
    if command_field is not None:
        command = _one(command_field, "SSL passphrase command")
        reload_field = next(rest, None)
        if reload_field is not None:
            if next(rest, None) is not None:
                raise _BadLine("extra fields at end of line")
            value = _parse_bool(reload_field[0].string) if len(reload_field) == 1 else None
            if value is None:
                raise _BadLine("incorrect syntax for boolean value SSL_passphrase_cmd_reload")
            reload = value
    return HostsLine(names, cert, key, ca, command, reload, line_no)


def _context(line_no: int, path: str) -> str:
    return f'line {line_no} of configuration file "{path}"'


def _refuse(message: str, line: HostsLine, path: str) -> TLSSetupError:
    return TLSSetupError(message, context=_context(line.line_no, path))


def _check_names(lines: list[HostsLine], path: str) -> None:
    """be_tls_init's checks: one default, one no_sni, each name once (case ignored)."""
    seen: set[str] = set()
    specials: set[str] = set()
    for line in lines:
        special = line.special
        if special is not None:
            if special in specials:
                which = "default" if special == DEFAULT_HOST else "no_sni"
                raise _refuse(f"multiple {which} hosts specified", line, path)
            specials.add(special)
            continue
        for name in line.hostnames:
            folded = name.lower()
            if folded in seen:
                raise _refuse(f'multiple entries for host "{name}" specified', line, path)
            seen.add(folded)


def load_hosts(path: str) -> list[HostsLine] | None:
    try:
        text = read_text(path)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None
        message = f'could not open file "{path}": {e.strerror}'
        refusal = TLSSetupError(f'could not load "pg_hosts.conf": {message}')
        refusal.preceding.append((message, None))
        raise refusal from None
    lines, bad = [], []
    for line_no, _text, fields in tokenize(path, text):
        try:
            if isinstance(fields, LineError):
                raise _BadLine(fields.message)
            lines.append(_parse_line(fields, line_no))
        except _BadLine as e:
            bad.append((str(e), _context(line_no, path)))
    if bad:
        # PostgreSQL logs every bad line, then refuses the file
        refusal = TLSSetupError(f'could not load "pg_hosts.conf": loading config from "{path}" '
                                "failed due to parsing error")
        refusal.preceding.extend(bad)
        raise refusal
    if not lines:
        return None
    _check_names(lines, path)
    return lines


def hosts_file(data_dir: str, setting: str) -> str:
    """hosts_file's path: relative names are relative to the data directory."""
    return os.path.join(data_dir, setting)
