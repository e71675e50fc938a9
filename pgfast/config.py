"""postgresql.conf, read the way PostgreSQL 15 reads it.

    describe_config(bindir) -> dict[str, str]
        name (lowercase) -> compiled-in default, from `BINDIR/postgres --describe-config`.

    load(data_dir, overrides=(), known=None) -> Settings
        reads DIR/postgresql.conf then DIR/postgresql.auto.conf (as PostgreSQL does), following
        include / include_if_exists / include_dir; `overrides` are (name, value) pairs from -c and win
        over the files. `known` is describe_config()'s result (None skips the unknown-name check for
        undotted names). Raises pgfast.errors.ConfigError with PostgreSQL's wording, naming file and
        line.

The scanner, include handling, value parsers and messages follow PostgreSQL 15's guc-file.l and
guc.c, quirks included (a syntax error at end of a file without a final newline is reported on
the line before, an earlier duplicate line is only ignored when its name is spelled identically).
"""
from __future__ import annotations

import errno
import math
import os
import re
import stat
import subprocess
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from pgfast import log
from pgfast.errors import ConfigError


@dataclass(frozen=True)
class Settings:
    data_dir: str                           # absolute
    listen_addresses: tuple[str, ...]       # ('localhost',) by default; () when ''
    port: int                               # 5432
    max_connections: int                    # 100
    unix_socket_directories: tuple[str, ...]  # PostgreSQL's compiled default (describe-config) or '/tmp'
    ssl: bool
    ssl_cert_file: str                      # absolute path
    ssl_key_file: str                       # absolute path
    ssl_ca_file: str | None                 # absolute; None when unset and DIR/root.crt absent
    ssl_crl_file: str | None                # absolute; None when unset and DIR/root.crl absent
    ssl_crl_dir: str | None
    ssl_ciphers: str                        # 'HIGH:MEDIUM:+3DES:!aNULL'
    ssl_min_protocol_version: str           # 'TLSv1.2'
    ssl_max_protocol_version: str           # '' means no maximum
    ssl_ecdh_curve: str | None              # ssl_groups in PostgreSQL 18; None when not set anywhere
                                            # (pgfast then picks PostgreSQL 18's default)
    ssl_prefer_server_ciphers: bool         # True
    ssl_passphrase_command: str             # ''
    ssl_passphrase_command_supports_reload: bool
    hba_file: str                           # absolute, default DIR/pg_hba.conf
    ident_file: str                         # absolute, default DIR/pg_ident.conf
    authentication_timeout: float           # seconds, default 60
    pgfast: dict[str, object] = field(default_factory=dict)        # 'pgfast.*' settings, typed
    # every -c setting but pgfast's own, for PostgreSQL too: a setting both sides read
    # (max_connections, authentication_timeout, ...) must mean the same on both
    postgres_overrides: tuple[tuple[str, str], ...] = ()
    raw: dict[str, str] = field(default_factory=dict)  # every setting seen (last wins), for diagnostics
    ssl_tls13_ciphers: str = ""             # PostgreSQL 18; '' leaves OpenSSL's TLS 1.3 suites
    # the PostgreSQL behind has 18's TLS settings (ssl_groups, ssl_tls13_ciphers), so pgfast
    # speaks of them in 18's words ("TLSv1.2 cipher list", "ssl_groups")
    tls_settings_18: bool = False


class _BadValue(Exception):
    """A value parser's complaint; the caller adds where the value came from."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


# A value parser gets the name as the user spelled it (PostgreSQL's messages echo it) and the value.
_Parser = Callable[[str, str], object]

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _lower(text: str) -> str:
    # PostgreSQL folds case in ASCII only (guc_name_compare, pg_strcasecmp).
    return text.translate(_ASCII_LOWER)


# ---------------------------------------------------------------- value parsers (guc.c)

def _string(name: str, value: str) -> str:
    return value


_BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False,
               "on": True, "off": False, "1": True, "0": False}


def _boolean(name: str, value: str) -> bool:
    # parse_bool accepts any unambiguous prefix of these words: "o" is ambiguous, "of" is off.
    lowered = _lower(value)
    words = [word for word in _BOOL_WORDS if lowered and word.startswith(lowered)]
    if len(words) != 1:
        raise _BadValue(f'parameter "{name}" requires a Boolean value')
    return _BOOL_WORDS[words[0]]


_C_SPACE = " \t\n\v\f\r"
_STRTOL = re.compile(r"[ \t\n\v\f\r]*(?P<sign>[-+]?)"
                     r"(?:0[xX](?P<hex>[0-9a-fA-F]+)|(?P<oct>0[0-7]*)|(?P<dec>[1-9][0-9]*))")
_STRTOD = re.compile(r"[ \t\n\v\f\r]*[-+]?(?:"
                     r"(?P<hex>0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)(?:[pP][-+]?[0-9]+)?)"
                     r"|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)")
_LONG_MIN, _LONG_MAX = -2**63, 2**63 - 1
_INT_MIN, _INT_MAX = -2**31, 2**31 - 1

# guc.c's time_unit_conversion_table for settings whose base unit is seconds, largest first.
_SECONDS_PER_UNIT = (("d", 86400.0), ("h", 3600.0), ("min", 60.0), ("s", 1.0),
                     ("ms", 1.0 / 1000), ("us", 1.0 / (1000 * 1000)))
_TIME_UNITS_HINT = 'Valid units for this parameter are "us", "ms", "s", "min", "h", and "d".'


def _strtol(text: str) -> tuple[int, int, bool]:
    """C strtol(text, &end, 0): (value, end offset, overflowed)."""
    m = _STRTOL.match(text)
    if not m:
        return 0, 0, False
    if m["hex"]:
        value = int(m["hex"], 16)
    elif m["oct"]:
        value = int(m["oct"], 8)
    else:
        value = int(m["dec"])
    value = -value if m["sign"] == "-" else value
    return value, m.end(), not _LONG_MIN <= value <= _LONG_MAX


def _strtod(text: str) -> tuple[float, int, bool]:
    """C strtod(text, &end) for the inputs parse_int hands it: (value, end offset, overflowed)."""
    m = _STRTOD.match(text)
    if not m:
        return 0.0, 0, False
    number = m.group().lstrip(_C_SPACE)
    if m["hex"]:
        value = float.fromhex(number)
    else:
        value = float(number)
    return value, m.end(), math.isinf(value)


def _rint(value: float) -> float:
    # round() is round-half-even like C rint() in the default rounding mode, but rejects infinities.
    return float(round(value)) if math.isfinite(value) else value


def _to_seconds(value: float, unit_text: str) -> float | None:
    """convert_to_base_unit for a seconds setting; None for an unknown unit or trailing junk."""
    m = re.fullmatch(r"([^ \t\n\v\f\r]{1,3})[ \t\n\v\f\r]*", unit_text)
    units = [unit for unit, _ in _SECONDS_PER_UNIT]
    if not m or m[1] not in units:
        return None
    i = units.index(m[1])
    seconds = value * _SECONDS_PER_UNIT[i][1]
    if i + 1 < len(_SECONDS_PER_UNIT):
        # "1.0001min" is rounded to whole seconds, as PostgreSQL rounds to the next smaller unit.
        smaller = _SECONDS_PER_UNIT[i + 1][1]
        seconds = _rint(seconds / smaller) * smaller
    return seconds


def _parse_int(value: str, seconds: bool) -> tuple[int | None, str | None]:
    """guc.c parse_int: (number, None) or (None, hint-or-None)."""
    number, end, overflow = _strtol(value)
    # Decimal points, exponents and numbers too big for a long go through strtod instead.
    if value[end:end + 1] in (".", "e", "E") or overflow:
        number, end, overflow = _strtod(value)
    if end == 0 or overflow:
        return None, None
    rest = value[end:].lstrip(_C_SPACE)
    if rest:
        if not seconds:
            return None, None
        number = _to_seconds(number, rest)
        if number is None:
            return None, _TIME_UNITS_HINT
    rounded = _rint(number)
    if not _INT_MIN <= rounded <= _INT_MAX:
        return None, "Value exceeds integer range."
    return int(rounded), None


def _integer(minimum: int, maximum: int, seconds: bool = False) -> _Parser:
    """An integer setting; with seconds=True it takes time units and its base unit is seconds."""
    unit = " s" if seconds else ""

    def parse(name: str, value: str) -> int:
        number, hint = _parse_int(value, seconds)
        if number is None:
            raise _BadValue(f'invalid value for parameter "{name}": "{value}"', hint)
        if not minimum <= number <= maximum:
            raise _BadValue(f'{number}{unit} is outside the valid range for parameter "{name}" '
                            f'({minimum} .. {maximum})')
        return number

    return parse


def _enum(*options: str) -> _Parser:
    # config_enum_get_options joins every option, so an '' option shows as a leading ", ".
    hint = f"Available values: {', '.join(options)}."

    def parse(name: str, value: str) -> str:
        for option in options:
            if _lower(option) == _lower(value):
                return option
        raise _BadValue(f'invalid value for parameter "{name}": "{value}"', hint)

    return parse


def _boolean_or(word: str) -> _Parser:
    """An enum of on, off and one more word, on and off spelled as any boolean (as
    PostgreSQL's huge_pages takes true, yes, 1 ...); the value is 'on', 'off' or word."""
    hint = f"Available values: off, on, {word}."

    def parse(name: str, value: str) -> str:
        if _lower(value.strip()) == word:
            return word
        try:
            return "on" if _boolean(name, value) else "off"
        except _BadValue:
            raise _BadValue(f'invalid value for parameter "{name}": "{value}"', hint) from None

    return parse


_SCANNER_SPACE = " \t\n\r\f"
_QUOTED_ELEMENT = re.compile(r'"((?:[^"]|"")*)"')


def _skip_space(value: str, pos: int) -> int:
    while pos < len(value) and value[pos] in _SCANNER_SPACE:
        pos += 1
    return pos


def _split_list(value: str, directories: bool) -> list[str] | None:
    """varlena.c SplitGUCList (directories=False) / SplitDirectoriesString; None on bad syntax.

    Elements are separated by commas and may be double-quoted ("" inside stands for ").
    An unquoted address ends at whitespace; an unquoted directory may contain spaces.
    """
    elements: list[str] = []
    pos = _skip_space(value, 0)
    if pos == len(value):
        return elements
    stops = "," if directories else "," + _SCANNER_SPACE
    while True:
        if value.startswith('"', pos):
            quoted = _QUOTED_ELEMENT.match(value, pos)
            if not quoted:
                return None
            elements.append(quoted[1].replace('""', '"'))
            pos = quoted.end()
        else:
            end = pos
            while end < len(value) and value[end] not in stops:
                end += 1
            element = value[pos:end].rstrip(_SCANNER_SPACE)
            if not element:
                return None
            elements.append(element)
            pos = end
        pos = _skip_space(value, pos)
        if pos == len(value):
            return elements
        if value[pos] != ",":
            return None
        pos = _skip_space(value, pos + 1)


def _list(directories: bool) -> _Parser:
    def parse(name: str, value: str) -> tuple[str, ...]:
        elements = _split_list(value, directories)
        if elements is None:
            raise _BadValue(f'invalid list syntax in parameter "{_lower(name)}"')
        return tuple(elements)

    return parse


_TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")

# The PostgreSQL settings pgfast itself acts on; only these have their values checked here.
_HONOURED: dict[str, _Parser] = {
    "listen_addresses": _list(directories=False),
    "port": _integer(1, 65535),
    "max_connections": _integer(1, 262143),
    "unix_socket_directories": _list(directories=True),
    "ssl": _boolean,
    "ssl_cert_file": _string,
    "ssl_key_file": _string,
    "ssl_ca_file": _string,
    "ssl_crl_file": _string,
    "ssl_crl_dir": _string,
    "ssl_ciphers": _string,
    "ssl_min_protocol_version": _enum(*_TLS_VERSIONS),
    "ssl_max_protocol_version": _enum("", *_TLS_VERSIONS),
    "ssl_ecdh_curve": _string,
    "ssl_groups": _string,                  # PostgreSQL 18
    "ssl_tls13_ciphers": _string,           # PostgreSQL 18
    "ssl_prefer_server_ciphers": _boolean,
    "ssl_passphrase_command": _string,
    "ssl_passphrase_command_supports_reload": _boolean,
    "ssl_sni": _boolean,                    # PostgreSQL 19: pgfast.ssl_sni
    "hosts_file": _string,                  # PostgreSQL 19: pgfast.hosts_file
    "hba_file": _string,
    "ident_file": _string,
    "authentication_timeout": _integer(1, 600, seconds=True),
}

MAX_WORKERS = 64


def _workers(name: str, value: str) -> int:
    """'auto': one worker process per core, at most 8; or a number."""
    if _lower(value.strip()) == "auto":
        return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
    return _integer(1, MAX_WORKERS)(name, value)


def _listen_address(name: str, value: str) -> tuple[str, int] | None:
    """'host:port' ('[v6]:port'), or '' for off."""
    value = value.strip()
    if not value:
        return None
    host, _, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise _BadValue(f'invalid value for parameter "{name}": "{value}"',
                        "Use host:port, e.g. 127.0.0.1:9187, or '' to turn it off.")
    return host, int(port)


# pgfast's own settings, name -> (parser, default). PostgreSQL treats them as custom placeholders.
PGFAST_SETTINGS: dict[str, tuple[_Parser, object]] = {
    "pgfast.postgres_bin": (_string, None),  # None: pgfast finds postgres itself
    # worker processes sharing the listening ports (SO_REUSEPORT), each with its own event loop
    "pgfast.workers": (_workers, _workers("pgfast.workers", "auto")),
    # the role pgfast reads catalogs as; None: the account running PostgreSQL (initdb's default)
    "pgfast.admin_user": (_string, None),
    # 'session' keeps backends for the next client (pool.py), 'transaction' lends them for one
    # transaction at a time (txpool.py), 'none' gives each client a backend of its own
    "pgfast.pool_mode": (_enum("session", "transaction", "none"), "session"),
    # session: idle backends kept per startup packet; transaction: backends per role and database
    "pgfast.pool_size": (_integer(0, 100000), 20),
    "pgfast.pool_idle_timeout": (_integer(1, 86400, seconds=True), 600),
    "pgfast.pool_lifetime": (_integer(1, 864000, seconds=True), 3600),
    "pgfast.server_reset_query": (_string, "DISCARD ALL"),
    # transaction pooling
    "pgfast.max_client_conn": (_integer(1, 1000000), 10000),
    "pgfast.query_wait_timeout": (_integer(1, 86400, seconds=True), 120),
    "pgfast.reserve_pool_size": (_integer(0, 100000), 0),
    "pgfast.reserve_pool_timeout": (_integer(0, 86400, seconds=True), 5),
    "pgfast.min_pool_size": (_integer(0, 100000), 0),
    "pgfast.idle_transaction_timeout": (_integer(0, 86400, seconds=True), 0),   # 0: off
    # give each backend its client's address and TLS facts as pgfast.* settings (identity.py):
    # 'session' where a backend serves one client for a whole session (session pooling, none),
    # 'on' also per transaction under transaction pooling, which costs PostgreSQL a statement
    # for nearly every transaction
    "pgfast.client_identity": (_boolean_or("session"), "session"),
    # Prometheus /metrics (metrics.py); None: off
    "pgfast.metrics_listen": (_listen_address, None),
    # the admin console (console.py): roles that may run every command, or only SHOW
    "pgfast.console_users": (_list(directories=False), ()),
    "pgfast.stats_users": (_list(directories=False), ()),
    # PostgreSQL 19's server SNI (hosts.py), under names every PostgreSQL behind accepts;
    # with 19 behind, ssl_sni and hosts_file set them too
    "pgfast.ssl_sni": (_boolean, False),
    "pgfast.hosts_file": (_string, "pg_hosts.conf"),
    # upstream mode (upstream.py): the remote servers, as a libpq connection string; None:
    # pgfast runs the PostgreSQL of its data directory
    "pgfast.upstream": (_string, None),
    # the role that reads the upstream's catalogs and runs the health checks; None: admin_user's rule
    "pgfast.auth_user": (_string, None),
    # the login query pgfast.auth_user runs instead of reading pg_authid itself: a call of the
    # SECURITY DEFINER function catalog.auth_function_sql() creates; None: the built-in query
    "pgfast.auth_query": (_string, None),
    # passwords of the roles pgfast logs in as by itself, in libpq's .pgpass format, mode 0600
    "pgfast.passfile": (_string, "upstream.pgpass"),
    "pgfast.health_check_period": (_integer(1, 86400, seconds=True), 10),
    "pgfast.health_check_timeout": (_integer(1, 3600, seconds=True), 5),
    # bytes of WAL a standby may be behind the primary and still serve reads
    "pgfast.max_standby_lag": (_integer(0, 1 << 50), 16 << 20),
    # "app" + this suffix names database app on a standby
    "pgfast.standby_suffix": (_string, "@standby"),
}
# pgfast settings that ALTER ROLE / ALTER DATABASE ... SET may override for a role or database
PER_ROLE_SETTINGS = ("pgfast.pool_mode", "pgfast.pool_size")


def parse_pgfast_setting(name: str, value: str) -> object:
    """A pgfast setting's value from elsewhere than the files (the catalogs); ConfigError."""
    try:
        return PGFAST_SETTINGS[name][0](name, value)
    except _BadValue as e:
        raise ConfigError(e.message, hint=e.hint) from None

# PostgreSQL 15 settings that --describe-config leaves out (GUC_NO_SHOW_ALL, GUC_NOT_IN_SAMPLE,
# GUC_DISALLOW_IN_FILE) but that postgresql.conf or -c may still name; found by asking
# `postgres -C` about every identifier in the server binary.
_UNDESCRIBED = frozenset("""
    allow_in_place_tablespaces allow_system_table_mods application_name backtrace_functions
    block_size config_file data_checksums data_directory_mode debug_assertions debug_discard_caches
    default_with_oids force_parallel_mode ignore_checksum_failure ignore_invalid_pages
    ignore_system_indexes in_hot_standby integer_datetimes is_superuser jit_debugging_support
    jit_dump_bitcode jit_expressions jit_profiling_support jit_tuple_deforming lc_collate lc_ctype
    max_function_args max_identifier_length max_index_keys post_auth_delay pre_auth_delay
    remove_temp_files_after_crash restrict_nonsystem_relation_kind role seed segment_size
    server_encoding server_version server_version_num session_authorization shared_memory_size
    shared_memory_size_in_huge_pages sort_mem ssl_library ssl_renegotiation_limit trace_notify
    trace_recovery_messages trace_sort transaction_deferrable transaction_isolation
    transaction_read_only vacuum_mem wal_block_size wal_consistency_checking wal_segment_size
    zero_damaged_pages
""".split())


def _parser_for(name: str) -> _Parser | None:
    if name in PGFAST_SETTINGS:
        return PGFAST_SETTINGS[name][0]
    return _HONOURED.get(name)


# ---------------------------------------------------------------- scanner (guc-file.l)

_LETTER = r"A-Za-z_\x80-\xff"      # the text is latin-1 decoded: one character per byte
_ID = rf"[{_LETTER}][{_LETTER}0-9]*"
# guc-file.l's rules in order: flex takes the longest match, the earliest rule on a tie.
_RULES = [(kind, re.compile(pattern)) for kind, pattern in (
    ("EOL", r"\n"),
    ("SKIP", r"[ \t\r]+|#[^\n]*"),
    ("ID", _ID),
    ("QUALIFIED_ID", rf"{_ID}\.{_ID}"),
    ("STRING", r"'(?:[^'\\\n]|\\[^\n]|'')*'"),
    ("UNQUOTED_STRING", rf"[{_LETTER}][{_LETTER}0-9\-._:/]*"),
    ("INTEGER", r"[-+]?(?:0x[0-9a-fA-F]+|[0-9]+)[A-Za-z]*"),
    ("REAL", r"[-+]?[0-9]*\.[0-9]*(?:[Ee][-+]?[0-9]+)?"),
    ("EQUALS", r"="),
    ("ERROR", r"[^\n]"),
)]
_NAME_TOKENS = ("ID", "QUALIFIED_ID")
_VALUE_TOKENS = ("ID", "STRING", "INTEGER", "REAL", "UNQUOTED_STRING")


def _tokens(text: str) -> Iterator[tuple[str, str]]:
    pos = 0
    while pos < len(text):
        kind, m = max(((kind, m) for kind, rule in _RULES if (m := rule.match(text, pos))),
                      key=lambda candidate: candidate[1].end())
        pos = m.end()
        if kind != "SKIP":
            yield kind, m.group()
    yield "EOF", ""


class _Scanner:
    """Tokens plus ConfigFileLineno, which counts the newlines returned so far."""

    def __init__(self, text: str):
        self._tokens = _tokens(text)
        self.lineno = 1

    def next(self) -> tuple[str, str]:
        kind, text = next(self._tokens)
        if kind == "EOL":
            self.lineno += 1
        return kind, text


def _text(latin1: str) -> str:
    """Scanner text back to a str; like the C string PostgreSQL keeps, it ends at a NUL byte."""
    return latin1.split("\0", 1)[0].encode("latin-1").decode("utf-8", "surrogateescape")


_QUOTED_PART = re.compile(r"\\([0-7]{1,3}|.)|''", re.S)
_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def _deescape(token: str) -> str:
    """DeescapeQuotedString: strip the quotes, undo '' and backslash escapes (octal is one byte)."""
    def replace(m: re.Match[str]) -> str:
        escaped = m[1]
        if escaped is None:
            return "'"
        if escaped[0] in "01234567":
            return chr(int(escaped, 8) & 0xFF)
        return _ESCAPES.get(escaped, escaped)

    return _QUOTED_PART.sub(replace, token[1:-1])


# ---------------------------------------------------------------- files and includes

class _Item(NamedTuple):
    name: str           # as spelled
    value: str
    file: str | None    # None for -c
    line: int


def _where(item: _Item) -> str:
    return "" if item.file is None else f' in file "{item.file}" line {item.line}'


_MAX_DEPTH = 10


def _canonical(path: str) -> str:
    # canonicalize_path also folds a leading "//", which normpath keeps.
    path = os.path.normpath(path)
    return "/" + path.lstrip("/") if path.startswith("//") else path


def _absolute(location: str, calling_file: str) -> str:
    """AbsoluteConfigLocation: relative names are relative to the including file's directory."""
    if os.path.isabs(location):
        return location
    return _canonical(os.path.join(os.path.dirname(calling_file), location))


def _syntax_error(path: str, scanner: _Scanner, kind: str, text: str) -> ConfigError:
    if kind in ("EOL", "EOF"):
        # At EOF no newline was counted, so PostgreSQL names the line before.
        return ConfigError(f'syntax error in file "{path}" line {scanner.lineno - 1}, near end of line')
    return ConfigError(f'syntax error in file "{path}" line {scanner.lineno}, near token "{_text(text)}"')


def _parse_text(text: str, path: str, depth: int, items: list[_Item]) -> None:
    """ParseConfigFp: one `name [=] value` per line; include directives are followed at once."""
    scanner = _Scanner(text)
    while True:
        kind, token = scanner.next()
        if kind == "EOF":
            return
        if kind == "EOL":
            continue
        if kind not in _NAME_TOKENS:
            raise _syntax_error(path, scanner, kind, token)
        name = _text(token)
        kind, token = scanner.next()
        if kind == "EQUALS":
            kind, token = scanner.next()
        if kind not in _VALUE_TOKENS:
            raise _syntax_error(path, scanner, kind, token)
        value = _text(_deescape(token) if kind == "STRING" else token)
        kind, token = scanner.next()
        if kind == "EOF":
            scanner.lineno += 1
        elif kind != "EOL":
            raise _syntax_error(path, scanner, kind, token)
        _directive(_Item(name, value, path, scanner.lineno - 1), depth, items)
        if kind == "EOF":
            return


def _directive(item: _Item, depth: int, items: list[_Item]) -> None:
    directive = _lower(item.name)
    if directive == "include_dir":
        _parse_dir(item.value, item.file, depth + 1, items)
    elif directive in ("include", "include_if_exists"):
        _parse_file(item.value, item.file, depth + 1, items, strict=directive == "include")
    else:
        items.append(item)


def _parse_file(config_file: str, calling_file: str | None, depth: int, items: list[_Item],
                strict: bool) -> None:
    """ParseConfigFile; calling_file is None only for the data directory's own files."""
    if not config_file.strip(" \t\r\n"):
        # An empty name would make PostgreSQL read the including file's directory.
        raise ConfigError(f'empty configuration file name: "{config_file}"')
    if depth > _MAX_DEPTH:
        raise ConfigError(f'could not open configuration file "{config_file}": '
                          'maximum nesting depth exceeded')
    path = config_file if calling_file is None else _absolute(config_file, calling_file)
    if path == calling_file:
        raise ConfigError(f'configuration file recursion in "{calling_file}"')
    try:
        with open(path, "rb") as f:
            data = f.read()
    except IsADirectoryError:
        # fopen() succeeds on a directory; PostgreSQL's scanner then fails reading it.
        raise ConfigError(f'input in flex scanner failed at file "{path}" line 1') from None
    except OSError as e:
        if strict:
            raise ConfigError(f'could not open configuration file "{path}": {e.strerror}') from None
        log.log(f'skipping missing configuration file "{path}"')
        return
    _parse_text(data.decode("latin-1"), path, depth, items)


def _parse_dir(includedir: str, calling_file: str, depth: int, items: list[_Item]) -> None:
    """ParseConfigDirectory: every *.conf not starting with '.', in strcmp order."""
    if not includedir.strip(" \t\r\n"):
        raise ConfigError(f'empty configuration directory name: "{includedir}"')
    directory = _absolute(includedir, calling_file)
    try:
        names = os.listdir(directory)
    except OSError as e:
        raise ConfigError(f'could not open configuration directory "{directory}": {e.strerror}') from None
    files = []
    for name in names:
        if name.startswith(".") or not name.endswith(".conf"):
            continue
        path = _canonical(os.path.join(directory, name))
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            raise ConfigError(f'could not stat file "{path}": {e.strerror}') from None
        if not stat.S_ISDIR(mode):
            files.append(path)
    for path in sorted(files, key=os.fsencode):
        _parse_file(path, calling_file, depth, items, strict=True)


def _read_files(data_dir: str) -> list[_Item]:
    conf = os.path.join(data_dir, "postgresql.conf")
    try:
        os.stat(conf)
    except OSError as e:
        raise ConfigError(f'could not access the server configuration file "{conf}": {e.strerror}') from None
    items: list[_Item] = []
    _parse_file(conf, None, 0, items, strict=True)
    _parse_file(os.path.join(data_dir, "postgresql.auto.conf"), None, 0, items, strict=False)
    return items


# ---------------------------------------------------------------- names and values

_CUSTOM_PART = r"(?:[A-Za-z_]|[^\x00-\x7f])(?:[A-Za-z_0-9$]|[^\x00-\x7f])*"
_CUSTOM_NAME = re.compile(rf"{_CUSTOM_PART}(?:\.{_CUSTOM_PART})+")


# PostgreSQL 18's map_old_guc_names for a setting pgfast reads: either name sets it, and
# the later line wins (PostgreSQL 15 knows only ssl_ecdh_curve). PostgreSQL 19's SNI settings
# are pgfast's own under older PostgreSQL, which would refuse the bare names.
_RENAMED = {"ssl_ecdh_curve": "ssl_groups", "ssl_sni": "pgfast.ssl_sni", "hosts_file": "pgfast.hosts_file"}


def _check_name(item: _Item, known: Mapping[str, str] | None) -> None:
    """find_option: dotted names are custom placeholders, except pgfast's own prefix."""
    name = _lower(item.name)
    if "." not in name:
        if known is None or name in known or name in _UNDESCRIBED or _RENAMED.get(name) in known:
            return
    elif name in PGFAST_SETTINGS:
        return
    elif not _CUSTOM_NAME.fullmatch(item.name):
        # Only -c can get here: the file scanner admits no other dotted names.
        raise ConfigError(f'invalid configuration parameter name "{item.name}"',
                          detail="Custom parameter names must be two or more simple identifiers "
                                 "separated by dots.")
    elif not name.startswith("pgfast."):
        return
    raise ConfigError(f'unrecognized configuration parameter "{item.name}"{_where(item)}')


def _typed(items: Iterable[_Item]) -> dict[str, object]:
    """The parsed values of the settings pgfast uses, later items winning."""
    values: dict[str, object] = {}
    for item in items:
        name = _lower(item.name)
        parse = _parser_for(name)
        if parse is None:
            continue
        try:
            values[_RENAMED.get(name, name)] = parse(item.name, item.value)
        except _BadValue as e:
            raise ConfigError(e.message + _where(item), hint=e.hint) from None
    return values


def _effective(items: list[_Item]) -> list[_Item]:
    """The file lines PostgreSQL applies: it drops an earlier line only when a later one spells
    the name identically, so `PORT = x` followed by `port = 1` is still an error."""
    last = {item.name: item for item in items}
    return [item for item in items if last[item.name] is item]


def _data_directory(data_dir: str) -> str:
    path = os.path.abspath(data_dir)
    try:
        os.stat(path)
    except OSError as e:
        hint = ("Run initdb or pg_basebackup to initialize a PostgreSQL data directory."
                if e.errno == errno.ENOENT else None)
        raise ConfigError(f'could not access directory "{path}": {e.strerror}', hint=hint) from None
    return path


def _file(data_dir: str, value: str) -> str:
    # The postmaster runs in the data directory, so relative names are relative to it. An empty
    # name stays empty, so opening it fails with the message PostgreSQL would give.
    return os.path.join(data_dir, value) if value else value


def _optional_file(data_dir: str, typed: dict[str, object], name: str, legacy: str) -> str | None:
    """'' means none; never set means DIR/<legacy> if present (root.crt, root.crl)."""
    if name in typed:
        return _file(data_dir, typed[name]) or None
    legacy_path = os.path.join(data_dir, legacy)
    return legacy_path if os.path.exists(legacy_path) else None


def _socket_directories(data_dir: str, typed: dict[str, object],
                        known: Mapping[str, str] | None) -> tuple[str, ...]:
    if "unix_socket_directories" in typed:
        directories = typed["unix_socket_directories"]
    else:
        default = (known or {}).get("unix_socket_directories", "/tmp")
        directories = _HONOURED["unix_socket_directories"]("unix_socket_directories", default)
    # '@name' is a Linux abstract socket, not a path.
    return tuple(d if d.startswith("@") else _canonical(os.path.join(data_dir, d))
                 for d in directories)


def _settings(data_dir: str, typed: dict[str, object], known: Mapping[str, str] | None,
              postgres_overrides: tuple[tuple[str, str], ...], raw: dict[str, str]) -> Settings:
    return Settings(
        data_dir=data_dir,
        listen_addresses=typed.get("listen_addresses", ("localhost",)),
        port=typed.get("port", 5432),
        max_connections=typed.get("max_connections", 100),
        unix_socket_directories=_socket_directories(data_dir, typed, known),
        ssl=typed.get("ssl", False),
        ssl_cert_file=_file(data_dir, typed.get("ssl_cert_file", "server.crt")),
        ssl_key_file=_file(data_dir, typed.get("ssl_key_file", "server.key")),
        ssl_ca_file=_optional_file(data_dir, typed, "ssl_ca_file", "root.crt"),
        ssl_crl_file=_optional_file(data_dir, typed, "ssl_crl_file", "root.crl"),
        ssl_crl_dir=_file(data_dir, typed.get("ssl_crl_dir", "")) or None,
        ssl_ciphers=typed.get("ssl_ciphers", "HIGH:MEDIUM:+3DES:!aNULL"),
        ssl_min_protocol_version=typed.get("ssl_min_protocol_version", "TLSv1.2"),
        ssl_max_protocol_version=typed.get("ssl_max_protocol_version", ""),
        ssl_ecdh_curve=typed.get("ssl_groups"),
        ssl_tls13_ciphers=typed.get("ssl_tls13_ciphers", ""),
        tls_settings_18=known is not None and "ssl_groups" in known,
        ssl_prefer_server_ciphers=typed.get("ssl_prefer_server_ciphers", True),
        ssl_passphrase_command=typed.get("ssl_passphrase_command", ""),
        ssl_passphrase_command_supports_reload=typed.get("ssl_passphrase_command_supports_reload",
                                                         False),
        hba_file=_file(data_dir, typed.get("hba_file", "pg_hba.conf")),
        ident_file=_file(data_dir, typed.get("ident_file", "pg_ident.conf")),
        authentication_timeout=float(typed.get("authentication_timeout", 60)),
        pgfast={name: typed.get(name, default) for name, (_, default) in PGFAST_SETTINGS.items()},
        postgres_overrides=postgres_overrides,
        raw=raw,
    )


# ---------------------------------------------------------------- public

def describe_config(bindir: str) -> dict[str, str]:
    """name -> default column of `postgres --describe-config` (which, unlike the server, runs as root).

    The columns are name, context, group, type, default, min, max, short and extra description.
    Only string and enum defaults are meaningful: PostgreSQL 15 prints 0/FALSE for numbers and
    booleans.
    """
    postgres = os.path.join(bindir, "postgres")
    try:
        result = subprocess.run([postgres, "--describe-config"], capture_output=True)
    except OSError as e:
        raise ConfigError(f'could not execute "{postgres}": {e.strerror}') from None
    if result.returncode != 0:
        raise ConfigError(f'"{postgres} --describe-config" failed with exit code {result.returncode}',
                          detail=result.stderr.decode("utf-8", "replace").strip() or None)
    described = {}
    for line in result.stdout.decode("utf-8", "surrogateescape").splitlines():
        columns = line.split("\t")
        if len(columns) >= 5:
            described[_lower(columns[0])] = columns[4]
    return described


def load(data_dir: str, overrides: Iterable[tuple[str, str]] = (),
         known: Mapping[str, str] | None = None) -> Settings:
    """Settings from DIR's configuration files and -c overrides, checked as PostgreSQL 15 would."""
    data_dir = _data_directory(data_dir)
    arguments = [_Item(name, value, None, 0) for name, value in overrides]
    # The postmaster applies -c before reading any file, so their errors come first.
    argument_values: dict[str, object] = {}
    for item in arguments:
        _check_name(item, known)
        argument_values |= _typed([item])
    items = _read_files(data_dir)
    for item in items:
        _check_name(item, known)
    # File values are checked even when -c overrides them, as PostgreSQL does.
    typed = _typed(_effective(items)) | argument_values
    postgres_overrides = tuple((item.name, item.value) for item in arguments
                               if _lower(item.name) not in PGFAST_SETTINGS)
    raw = {_lower(item.name): item.value for item in [*items, *arguments]}
    return _settings(data_dir, typed, known, postgres_overrides, raw)
