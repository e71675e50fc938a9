"""pgfast.upstream: the libpq connection string naming the remote PostgreSQL servers, and
libpq's password file.

People write pgfast.upstream as they would write it for psql, and when it is wrong they
search for the message libpq would print. So the grammar and the messages come from libpq's
fe-connect.c in PostgreSQL 18: conninfo_parse for keyword=value strings,
conninfo_uri_parse_options for postgresql:// and postgres:// URIs, pqConnectOptions2 for
host lists and value checks, the checks libpq only makes when it connects (ports, hostaddr,
integer options), and passwordFromFile for .pgpass. Where pgfast differs from libpq on
purpose, the comments say so. It reads no environment variables (PGHOST, PGSSLMODE, ...)
and no service files, because the upstream should be exactly what the configuration says.
sslmode defaults to verify-full, every host must be named, and no user name is taken from
the operating system.
"""
from __future__ import annotations

import os
import re
import socket
import stat
import string
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


class ConninfoError(ValueError):
    """A connection string or password file libpq would refuse. str() gives libpq's
    message, so the text users search for is the text they see."""


@dataclass(frozen=True)
class Host:
    """One server to try, in list order. libpq never uses TLS on a Unix socket, so sslmode
    has no effect on a `host` starting with "/" (pgfast connects to its .s.PGSQL.port;
    "@", Linux's abstract namespace, it does not reach).
    Without a host name, `host` is the hostaddr, which is also what libpq's PQhost()
    reports and what it looks up in the password file."""
    host: str
    port: int
    hostaddr: str | None = None


@dataclass(frozen=True, repr=False)
class Upstream:
    """A parsed pgfast.upstream. `options` keeps every keyword as given, plus libpq's
    defaults for the rest and file names made absolute. The typed properties read from
    it, so the two can never disagree. `hosts` stays in the written order (libpq's
    load_balance_hosts=random, which would shuffle it, upstream.not_taken refuses)."""
    hosts: tuple[Host, ...]
    options: Mapping[str, str]
    _described: str = field(default="", compare=False)

    def __repr__(self) -> str:
        # options holds the password: a repr that ends up in a log must not show it.
        return f"Upstream({self._described!r})"

    def describe(self) -> str:
        """The string as written, with every password= and sslpassword= value shown as
        ********, so it can be logged."""
        return self._described

    def _given(self, keyword: str) -> str | None:
        return self.options.get(keyword) or None     # libpq treats "" as not set

    @property
    def sslmode(self) -> str:
        """libpq's default is "prefer", which quietly falls back to no TLS and does not
        check the server certificate. pgfast passes its clients' credentials upstream,
        so its default is "verify-full". That is also the sslmode libpq picks when
        sslrootcert=system."""
        return self.options["sslmode"]

    @property
    def sslrootcert(self) -> str | None:
        return self._given("sslrootcert")

    @property
    def sslcert(self) -> str | None:
        return self._given("sslcert")

    @property
    def sslkey(self) -> str | None:
        return self._given("sslkey")

    @property
    def sslcrl(self) -> str | None:
        return self._given("sslcrl")

    @property
    def sslsni(self) -> bool:
        """libpq turns SNI on only when the value starts with "1". So "on" and "true"
        turn it off, as they do in libpq."""
        return self.options["sslsni"].startswith("1")

    @property
    def target_session_attrs(self) -> str:
        return self.options["target_session_attrs"]

    @property
    def connect_timeout(self) -> float | None:
        """Seconds, or None for no limit. Zero or a negative value means no limit, and a
        positive value below 2 becomes 2, as in libpq before PostgreSQL 18, so that
        rounding cannot make a connection attempt give up almost at once."""
        value = self.options.get("connect_timeout")
        seconds = 0 if value is None else _int(value, "connect_timeout")
        return float(max(seconds, 2)) if seconds > 0 else None

    @property
    def dbname(self) -> str | None:
        return self._given("dbname")

    @property
    def application_name(self) -> str | None:
        return self._given("application_name")


# The keywords pgfast accepts, with libpq's compiled-in default (PQconninfoOptions) or None
# if it has none. sslmode uses pgfast's default (see Upstream.sslmode). gssencmode is
# "disable", as in a libpq built without GSSAPI, which pgfast is.
_KEYWORDS: dict[str, str | None] = {
    "host": None, "hostaddr": None, "port": "5432", "dbname": None, "user": None,
    "password": None, "passfile": None, "connect_timeout": None, "application_name": None,
    "options": "", "channel_binding": "prefer", "sslmode": "verify-full",
    "sslnegotiation": "postgres", "sslrootcert": None, "sslcert": None, "sslkey": None,
    "sslcrl": None, "sslcrldir": None, "sslsni": "1", "sslpassword": None,
    "ssl_min_protocol_version": "TLSv1.2", "ssl_max_protocol_version": None,
    "gssencmode": "disable", "require_auth": None, "target_session_attrs": "any",
    "load_balance_hosts": "disable", "keepalives": None, "keepalives_idle": None,
    "keepalives_interval": None, "keepalives_count": None, "tcp_user_timeout": None,
}
_SECRETS = frozenset({"password", "sslpassword"})      # libpq's dispchar "*" options
_FILES = ("sslrootcert", "sslcert", "sslkey", "sslcrl", "sslcrldir", "passfile")
_INTEGERS = ("connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval",
             "keepalives_count", "tcp_user_timeout")
_TLS_VERSIONS = frozenset({"tlsv1", "tlsv1.1", "tlsv1.2", "tlsv1.3"})
_AUTH_BITS = {       # the AUTH_REQ_* bits each require_auth method allows
    "password": frozenset({"password"}), "md5": frozenset({"md5"}),
    "gss": frozenset({"gss", "gss_cont"}), "sspi": frozenset({"sspi", "gss_cont"}),
    "scram-sha-256": frozenset({"sasl", "sasl_cont", "sasl_fin"}),
}
_URI_PREFIXES = ("postgresql://", "postgres://")
_MASK = "********"

# These character classes are C's isspace() in the C locale, which is what libpq tests.
# Python's \s would also match Unicode spaces.
_WS = re.compile(r"[ \t\n\v\f\r]*")
_NAME = re.compile(r"[^= \t\n\v\f\r]*")
_QUOTED = re.compile(r"'((?:\\.|[^'\\])*)'", re.S)
_BARE = re.compile(r"(?:\\.|\\\Z|[^ \t\n\v\f\r\\])*", re.S)
_UNESCAPE = re.compile(r"\\(.?)", re.S)      # a trailing lone backslash disappears, as in libpq
_INT = re.compile(r"[ \t\n\v\f\r]*[+-]?[0-9]+[ \t\n\v\f\r]*")   # what strtol() plus pqParseIntParam accept


def parse(conninfo: str, *, base_dir: str | None = None) -> Upstream:
    """Parse pgfast.upstream the way libpq would. It fails at startup with libpq's message
    wherever libpq would fail, even in checks libpq only makes on its first connection.
    Relative file names are resolved against base_dir (pgfast passes the configuration
    directory) instead of whatever directory pgfast happens to run in."""
    options: dict[str, str] = {}
    secrets: list[tuple[int, int]] = []
    pairs = _uri_pairs if conninfo.startswith(_URI_PREFIXES) else _keyword_pairs
    for keyword, value, span in pairs(conninfo):
        if keyword == "requiressl":      # conninfo_storeval's translation, kept for old strings
            keyword, value = "sslmode", "require" if value.startswith("1") else "prefer"
        if keyword not in _KEYWORDS:
            raise ConninfoError(f'invalid connection option "{keyword}"')
        options[keyword] = value
        if keyword in _SECRETS and span[0] < span[1]:
            secrets.append(span)
    for keyword, default in _KEYWORDS.items():
        if default is not None:
            options.setdefault(keyword, default)

    slots = _slots(options)
    _check_values(options)
    hosts = tuple(_host(name, addr, port, options["sslmode"]) for name, addr, port in slots)
    for keyword in _INTEGERS:
        if keyword in options:
            _int(options[keyword], keyword)
    if base_dir is not None:
        for keyword in _FILES:
            value = options.get(keyword)
            if value and not (keyword == "sslrootcert" and value == "system"):
                options[keyword] = os.path.join(base_dir, value)     # an absolute value stays as it is

    described = conninfo
    for start, end in sorted(secrets, reverse=True):
        described = described[:start] + _MASK + described[end:]
    return Upstream(hosts, MappingProxyType(options), described)


def _keyword_pairs(s: str) -> Iterator[tuple[str, str, tuple[int, int]]]:
    """conninfo_parse: keyword = value, where a value is either bare up to whitespace or
    single-quoted, and a backslash escapes the next character in both."""
    pos = _WS.match(s).end()
    while pos < len(s):
        name = _NAME.match(s, pos).group()
        pos = _WS.match(s, pos + len(name)).end()
        if not s.startswith("=", pos):
            raise ConninfoError(f'missing "=" after "{name}" in connection info string')
        start = _WS.match(s, pos + 1).end()
        if s.startswith("'", start):
            match = _QUOTED.match(s, start)
            if match is None:
                raise ConninfoError("unterminated quoted string in connection info string")
            raw = match.group(1)
        else:
            match = _BARE.match(s, start)
            raw = match.group()
        yield name, _UNESCAPE.sub(r"\1", raw), (start, match.end())
        pos = _WS.match(s, match.end()).end()


def _scan(s: str, pos: int, stops: str) -> int:
    while pos < len(s) and s[pos] not in stops:
        pos += 1
    return pos


def _uri_pairs(uri: str) -> Iterator[tuple[str, str, tuple[int, int]]]:
    """conninfo_uri_parse_options: scheme://[user[:password]@][netloc][:port][,...][/dbname][?params]."""
    pos = len(next(p for p in _URI_PREFIXES if uri.startswith(p)))
    at = _scan(uri, pos, "@/")
    if uri.startswith("@", at):
        colon = _scan(uri, pos, ":@")
        if colon > pos:
            yield "user", _decode(uri[pos:colon]), (pos, colon)
        if uri[colon] == ":" and at > colon + 1:
            yield "password", _decode(uri[colon + 1:at]), (colon + 1, at)
        pos = at + 1

    netloc, hosts, ports = pos, [], []
    while True:
        if uri.startswith("[", pos):
            close = uri.find("]", pos + 1)
            if close < 0:
                raise ConninfoError('end of string reached when looking for matching "]" in '
                                    f'IPv6 host address in URI: "{uri}"')
            if close == pos + 1:
                raise ConninfoError(f'IPv6 host address may not be empty in URI: "{uri}"')
            hosts.append(uri[pos + 1:close])
            pos = close + 1
            if pos < len(uri) and uri[pos] not in ":/?,":
                raise ConninfoError(f'unexpected character "{uri[pos]}" at position {pos + 1} in URI '
                                    f'(expected ":" or "/"): "{uri}"')
        else:
            end = _scan(uri, pos, ":/?,")
            hosts.append(uri[pos:end])
            pos = end
        if uri.startswith(":", pos):
            end = _scan(uri, pos + 1, "/?,")
            ports.append(uri[pos + 1:end])
            pos = end
        else:
            ports.append("")    # libpq still writes the comma, so "h1,h2:5433" gives port ",5433"
        if not uri.startswith(",", pos):
            break
        pos += 1
    for keyword, value in (("host", ",".join(hosts)), ("port", ",".join(ports))):
        if value:
            yield keyword, _decode(value), (netloc, pos)

    if uri.startswith("/", pos):
        end = _scan(uri, pos + 1, "?")
        if end > pos + 1:       # an empty dbname is left unset, as libpq does
            yield "dbname", _decode(uri[pos + 1:end]), (pos + 1, end)
        pos = end
    if pos < len(uri):          # at the "?"
        yield from _query_pairs(uri, pos + 1)


def _query_pairs(uri: str, pos: int) -> Iterator[tuple[str, str, tuple[int, int]]]:
    """conninfo_uri_parse_params: key=value pairs joined by "&", both percent-decoded."""
    while pos < len(uri):
        end = _scan(uri, pos, "&")
        raw_keyword, equals, raw_value = uri[pos:end].partition("=")
        if not equals:
            raise ConninfoError(f'missing key/value separator "=" in URI query parameter: "{raw_keyword}"')
        if "=" in raw_value:
            raise ConninfoError(f'extra key/value separator "=" in URI query parameter: "{raw_keyword}"')
        keyword, value = _decode(raw_keyword), _decode(raw_value)
        if keyword == "ssl" and value == "true":       # libpq's nod to JDBC URLs
            keyword, value = "sslmode", "require"
        # requiressl is known: conninfo_storeval turns it into sslmode before looking it up
        if keyword not in _KEYWORDS and keyword != "requiressl":
            raise ConninfoError(f'invalid URI query parameter: "{keyword}"')
        yield keyword, value, (end - len(raw_value), end)
        pos = end + 1


def _decode(text: str) -> str:
    """conninfo_uri_decode as of PostgreSQL 18: percent-decoding, spaces around the value
    dropped, and an error for spaces inside it. Decoding works on bytes, so an encoded
    multi-byte character comes out whole."""
    out = bytearray()
    pos = len(text) - len(text.lstrip(" "))
    while pos < len(text) and text[pos] != " ":
        if text[pos] == "%":
            digits = text[pos + 1:pos + 3]
            if len(digits) < 2 or not set(digits) <= set(string.hexdigits):
                raise ConninfoError(f'invalid percent-encoded token: "{text}"')
            if digits == "00":
                raise ConninfoError(f'forbidden value %00 in percent-encoded value: "{text}"')
            out.append(int(digits, 16))
            pos += 3
        else:
            out += text[pos].encode("utf-8", "surrogateescape")
            pos += 1
    if text[pos:].lstrip(" "):
        raise ConninfoError(f'unexpected spaces found in "{text}", use percent-encoded spaces (%20) instead')
    return out.decode("utf-8", "surrogateescape")


def _slots(options: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """pqConnectOptions2's host list: (host, hostaddr, port) per server. hostaddr, if
    given, sets the count and host must match it. A single port applies to every host."""
    names, addrs, ports = (options.get(k, "") for k in ("host", "hostaddr", "port"))
    count = len((addrs or names).split(","))
    name_list = names.split(",") if names else [""] * count
    addr_list = addrs.split(",") if addrs else [""] * count
    if len(name_list) != count:
        raise ConninfoError(f"could not match {len(name_list)} host names to {count} hostaddr values")
    if not all(name or addr for name, addr in zip(name_list, addr_list)):
        # libpq would use the default Unix socket directory here. pgfast's upstream
        # should be a server the configuration names, not whatever is listening locally.
        raise ConninfoError("pgfast.upstream names no host")
    port_list = ports.split(",")
    if len(port_list) == 1:
        port_list *= count
    elif len(port_list) != count:
        raise ConninfoError(f"could not match {len(port_list)} port numbers to {count} hosts")
    return list(zip(name_list, addr_list, port_list))


def _check_values(options: Mapping[str, str]) -> None:
    """pqConnectOptions2's checks, in its order, so the first error is the same one libpq
    reports."""
    _check_require_auth(options.get("require_auth"))
    _check_choice(options, "channel_binding", ("disable", "prefer", "require"))
    _check_choice(options, "sslmode", ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"))
    _check_choice(options, "sslnegotiation", ("postgres", "direct"))
    sslmode = options["sslmode"]
    if options["sslnegotiation"] == "direct" and sslmode not in ("require", "verify-ca", "verify-full"):
        raise ConninfoError(f'weak sslmode "{sslmode}" may not be used with sslnegotiation=direct '
                            '(use "require", "verify-ca", or "verify-full")')
    if options.get("sslrootcert") == "system" and sslmode != "verify-full":
        raise ConninfoError(f'weak sslmode "{sslmode}" may not be used with sslrootcert=system '
                            '(use "verify-full")')
    low, high = options.get("ssl_min_protocol_version"), options.get("ssl_max_protocol_version")
    for keyword, version in (("ssl_min_protocol_version", low), ("ssl_max_protocol_version", high)):
        if version and version.lower() not in _TLS_VERSIONS:
            raise ConninfoError(f'invalid "{keyword}" value: "{version}"')
    if low and high and low.lower() != "tlsv1" and (high.lower() == "tlsv1" or low.lower() > high.lower()):
        raise ConninfoError("invalid SSL protocol version range")
    _check_choice(options, "gssencmode", ("disable", "prefer", "require"))
    if options["gssencmode"] == "require":
        raise ConninfoError('gssencmode value "require" invalid when GSSAPI support is not compiled in')
    _check_choice(options, "target_session_attrs",
                  ("any", "read-write", "read-only", "primary", "standby", "prefer-standby"))
    _check_choice(options, "load_balance_hosts", ("disable", "random"))


def _check_choice(options: Mapping[str, str], keyword: str, allowed: tuple[str, ...]) -> None:
    if options[keyword] not in allowed:
        raise ConninfoError(f'invalid {keyword} value: "{options[keyword]}"')


def _check_require_auth(value: str | None) -> None:
    """libpq's require_auth rules. Methods are either all plain or all negated ("!md5").
    "none" is about servers that ask for no authentication at all. Naming a method twice
    is refused, since a typo here would be risky."""
    if not value:
        return
    allowed: set[str] = set()
    required, negated = True, False
    for index, part in enumerate(value.split(",")):
        method = part
        if part.startswith("!"):
            if index == 0:
                allowed, required = set().union(*_AUTH_BITS.values()), False
            elif not negated:
                raise ConninfoError(f'negative require_auth method "{part}" cannot be mixed '
                                    'with non-negative methods')
            negated, method = True, part[1:]
        elif negated:
            raise ConninfoError(f'require_auth method "{part}" cannot be mixed with negative methods')
        if method == "none":
            duplicate, required = required == negated, negated
        elif method in _AUTH_BITS:
            bits = _AUTH_BITS[method]
            duplicate = not (allowed & bits) if negated else bits <= allowed
            allowed = allowed - bits if negated else allowed | bits
        else:
            raise ConninfoError(f'invalid require_auth value: "{method}"')
        if duplicate:
            raise ConninfoError(f'require_auth method "{part}" is specified more than once')


def _host(name: str, addr: str, port: str, sslmode: str) -> Host:
    """The checks libpq makes when it first tries a host, done here so a bad entry stops
    pgfast at startup instead of failing on every connection."""
    if addr:
        try:
            socket.getaddrinfo(addr, None, flags=socket.AI_NUMERICHOST)
        except socket.gaierror as exc:
            raise ConninfoError(f'could not parse network address "{addr}": {exc.strerror}') from None
        if not name and sslmode == "verify-full":
            raise ConninfoError("host name must be specified for a verified SSL connection")
    number = _int(port, "port") if port else 5432
    if not 1 <= number <= 65535:
        raise ConninfoError(f'invalid port number: "{port}"')
    return Host(name or addr, number, addr or None)


def _int(value: str, keyword: str) -> int:
    """pqParseIntParam: a C int, with whitespace allowed around it."""
    if _INT.fullmatch(value) and -2**31 <= int(value) < 2**31:
        return int(value)
    raise ConninfoError(f'invalid integer value "{value}" for connection option "{keyword}"')


# The password file. PassfileEntry is (host, port, database, user, password).

PassfileEntry = tuple[str, str, str, str, str]

# pg_config_manual.h. A libpq built by a distribution that moves the socket directory
# (Debian: /var/run/postgresql) treats that directory as "localhost" instead.
DEFAULT_PGSOCKET_DIR = "/tmp"

_PASSFILE_LINE = re.compile(r"((?:\\.|[^:\\])*):" * 4 + r"((?:\\.|[^:\\])*\\?)", re.S)
_PASSWORD_ESCAPE = re.compile(r"\\(.)", re.S)       # a trailing lone backslash stays, as in libpq


def read_passfile(path: str) -> list[PassfileEntry]:
    """The lines of a .pgpass that can match something. The first four fields are kept
    exactly as written, escapes included, because libpq treats only an unescaped "*" as
    a wildcard. The password has its escapes removed and ends at the first unescaped
    ":", as in libpq. A missing file raises FileNotFoundError, so the caller decides
    whether that matters."""
    with open(path, "rb") as file:
        text = file.read().decode("utf-8", "surrogateescape")
    entries = []
    for line in text.split("\n"):
        if line.startswith("#"):        # libpq checks for "#" before stripping the line end
            continue
        match = _PASSFILE_LINE.match(line.rstrip("\r\n"))
        if match:                       # libpq can never match a line with fewer than five fields
            *keys, password = match.groups()
            entries.append((*keys, _PASSWORD_ESCAPE.sub(r"\1", password)))
    return entries


def password_for(entries: Iterable[PassfileEntry], host: str, port: int, database: str,
                 user: str) -> str | None:
    """passwordFromFile's lookup: the first matching line wins. "localhost" also stands
    for the default Unix socket directory (and for no host at all). libpq does not look
    anything up without a database and a user."""
    if not database or not user:
        return None
    if host in ("", DEFAULT_PGSOCKET_DIR):
        host = "localhost"
    wanted = (host, str(port), database, user)
    for *keys, password in entries:
        if all(key == "*" or _UNESCAPE.sub(r"\1", key) == value for key, value in zip(keys, wanted)):
            return password
    return None


def check_passfile_permissions(path: str) -> None:
    """libpq only warns about a password file others can read, and then skips it. pgfast
    raises instead, with the same words, so it can refuse to start rather than run
    without the passwords it expected."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise ConninfoError(f'password file "{path}" is not a plain file')
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConninfoError(f'password file "{path}" has group or world access; '
                            'permissions should be u=rw (0600) or less')
