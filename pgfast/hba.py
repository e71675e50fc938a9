"""pg_hba.conf and pg_ident.conf, read and matched exactly as PostgreSQL 15 does.

A port of src/backend/libpq/hba.c (REL_15): tokenize_auth_file, parse_hba_line,
parse_hba_auth_opt, check_hba, parse_ident_line and check_ident_usermap.  Error
messages keep PostgreSQL's wording (users grep for it), followed by
` in file "F" line N`.  Where PostgreSQL logs every bad line and then refuses the
file, we raise at the first one.
"""
import ctypes
import functools
import ipaddress
import os
import re
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from . import log
from .errors import HbaError

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Every method PostgreSQL 15 knows (UserAuthName less "implicit reject").
PG_METHODS = frozenset({
    "trust", "reject", "ident", "peer", "password", "md5", "scram-sha-256",
    "gss", "sspi", "pam", "bsd", "ldap", "cert", "radius",
})
# Methods whose options this module parses; the others carry options (ldap*, radius*,
# krb_realm, ...) that would have to be honoured, so they can never be "supported".
_PARSEABLE_METHODS = frozenset({
    "trust", "reject", "password", "md5", "scram-sha-256", "cert", "ident", "peer",
})
_MAP_METHODS = frozenset({"ident", "peer", "gss", "sspi", "cert"})
# Options of methods pgfast refuses before options are read: on any line that gets
# this far they are misplaced, and PostgreSQL names the methods they belong to.
_OTHER_METHOD_OPTIONS = {
    **dict.fromkeys(("pamservice", "pam_use_hostname"), "pam"),
    **dict.fromkeys(("ldapurl", "ldaptls", "ldapscheme", "ldapserver", "ldapport",
                     "ldapbinddn", "ldapbindpasswd", "ldapsearchattribute",
                     "ldapsearchfilter", "ldapbasedn", "ldapprefix", "ldapsuffix"), "ldap"),
    **dict.fromkeys(("krb_realm", "include_realm"), "gssapi and sspi"),
    **dict.fromkeys(("compat_realm", "upn_username"), "sspi"),
    **dict.fromkeys(("radiusservers", "radiusports", "radiussecrets",
                     "radiusidentifiers"), "radius"),
}
_CONNTYPES = frozenset({"local", "host", "hostssl", "hostnossl", "hostgssenc", "hostnogssenc"})
_BLANKS = " \t\r"           # pg_isblank
_MAX_TOKEN_BYTES = 10239    # MAX_TOKEN in 15.x is 10240 bytes including the NUL
# PostgreSQL 15 recurses through @files without a limit until it runs out of file
# descriptors; 16 stops at this depth, which we borrow.
_MAX_INCLUDE_DEPTH = 10
_STRTOL_DIGITS = re.compile(r"[ \t\n\v\f\r]*[+-]?[0-9]+")


class LineError(Exception):
    """A line PostgreSQL would refuse; the caller adds the file and line number."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


# ---------------------------------------------------------------- tokens

@dataclass(frozen=True)
class Token:
    string: str
    quoted: bool    # began with a double quote, so it is never a keyword

    def is_keyword(self, word: str) -> bool:
        return not self.quoted and self.string == word


def read_text(path: str) -> str:
    # Bytes as written, so names that are not UTF-8 still compare as PostgreSQL would.
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "surrogateescape")


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(number of first physical line, line) with backslash continuations joined.

    As in 15's tokenize_auth_file: a continuation may fall inside quotes or a
    comment, and a backslash only continues if it arrived with the latest piece
    (so "\\\\" followed by an empty line is one literal backslash).
    """
    physical = text.split("\n")
    if physical[-1] == "":
        physical.pop()
    line_no, i = 1, 0
    while i < len(physical):
        line, continued_at, continuations = "", 0, 0
        while i < len(physical):
            line = (line + physical[i]).rstrip("\r\n")
            i += 1
            if len(line) > continued_at and line.endswith("\\"):
                line = line[:-1]
                continued_at = len(line)
                continuations += 1
                continue
            break
        yield line_no, line
        line_no += continuations + 1


def _next_token(line: str, pos: int) -> tuple[Token | None, bool, int]:
    """hba.c next_token: (token or None at end of line, ended by a comma, new pos)."""
    while pos < len(line) and (line[pos] in _BLANKS or line[pos] == ","):
        pos += 1
    chars: list[str] = []
    size = 0
    in_quote = was_quote = saw_quote = initial_quote = comma = False
    while pos < len(line) and (line[pos] not in _BLANKS or in_quote):
        c = line[pos]
        if c == "#" and not in_quote:
            pos = len(line)
            break
        width = len(c.encode("utf-8", "surrogateescape"))
        # C checks byte by byte, so a character that does not fit whole is too long
        if size + width > _MAX_TOKEN_BYTES:
            raise LineError('authentication file token too long, skipping: "%s"' % "".join(chars))
        if c == "," and not in_quote:
            comma = True
            break
        if c != '"' or was_quote:
            chars.append(c)
            size += width
        # a doubled double quote inside quotes is a literal one
        was_quote = (not was_quote) if (in_quote and c == '"') else False
        if c == '"':
            in_quote = not in_quote
            saw_quote = True
            initial_quote = initial_quote or not chars
        pos += 1
    if not (saw_quote or chars):
        return None, comma, pos
    return Token("".join(chars), initial_quote), comma, pos


def _next_field(line: str, pos: int, path: str, depth: int) -> tuple[list[Token], int]:
    """hba.c next_field_expand: a comma list, with @file tokens expanded in place."""
    tokens: list[Token] = []
    while True:
        token, comma, pos = _next_token(line, pos)
        if token is None:
            break
        if not token.quoted and len(token.string) > 1 and token.string[0] == "@":
            tokens.extend(_include(path, token.string[1:], depth + 1))
        else:
            tokens.append(token)
        if not comma:
            break
    return tokens, pos


def _fields(line: str, path: str, depth: int) -> list[list[Token]]:
    fields, pos = [], 0
    while pos < len(line):
        field, pos = _next_field(line, pos, path, depth)
        # An empty @file yields no field at all, shifting the rest left, as in 15.
        if field:
            fields.append(field)
    return fields


def _include(outer_path: str, name: str, depth: int) -> list[Token]:
    """Every token of an @file, flattened; it may @-include further files."""
    full = name if os.path.isabs(name) else os.path.normpath(
        os.path.join(os.path.dirname(outer_path), name))
    prefix = f'could not open secondary authentication file "@{name}" as "{full}"'
    if depth > _MAX_INCLUDE_DEPTH:
        raise LineError(f"{prefix}: maximum nesting depth exceeded")
    try:
        text = read_text(full)
    except OSError as e:
        raise LineError(f"{prefix}: {e.strerror}") from None
    return [token for _, line in _logical_lines(text)
            for field in _fields(line, full, depth) for token in field]


def tokenize(path: str, text: str) -> Iterator[tuple[int, str, list[list[Token]] | LineError]]:
    """tokenize_auth_file: (line number, line, its fields or why they cannot be read) for
    each line that is not empty; pg_hosts.conf is read with it too."""
    base = os.path.abspath(path)
    for line_no, line in _logical_lines(text):
        try:
            fields = _fields(line, base, 0)
        except LineError as e:
            yield line_no, line, e
            continue
        if fields:
            yield line_no, line, fields


def _parse_file(path: str, text: str, parse_line: Callable[[list[list[Token]], int, str], object]) -> list:
    parsed = []
    for line_no, line, fields in tokenize(path, text):
        try:
            if isinstance(fields, LineError):
                raise fields
            parsed.append(parse_line(fields, line_no, line))
        except LineError as e:
            raise HbaError(f'{e.message} in file "{path}" line {line_no}', hint=e.hint) from None
    return parsed


def _single(tokens: list[Token], message: str, hint: str | None = None) -> Token:
    if len(tokens) > 1:
        raise LineError(message, hint)
    return tokens[0]


# ---------------------------------------------------------------- pg_hba.conf lines

@dataclass(frozen=True)
class IpRange:
    """An address and mask as PostgreSQL keeps them: host bits in the address are
    ignored and the mask need not be contiguous (pg_range_sockaddr)."""
    version: int
    address: int
    mask: int

    def contains(self, ip: IpAddress) -> bool:
        # No IPv4-mapped IPv6 promotion: 15's check_ip wants the same family.
        return ip.version == self.version and (int(ip) ^ self.address) & self.mask == 0


@dataclass(frozen=True)
class HbaLine:
    file: str
    line_no: int
    text: str               # raw line, for log messages
    conntype: str           # 'local' | 'host' | 'hostssl' | 'hostnossl' | 'hostgssenc' | 'hostnogssenc'
    databases: tuple[Token, ...]
    users: tuple[Token, ...]
    ip_cmp: str | None      # None on local lines, else 'all' | 'samehost' | 'samenet' | 'mask' | 'hostname'
    ip: IpRange | None      # for 'mask'
    hostname: str | None    # for 'hostname': exact, or a suffix when it starts with '.'
    method: str             # 'ident' on a local line is already 'peer', as in PostgreSQL
    clientcert: str | None  # None | 'verify-ca' | 'verify-full'; user names are compared with the CN
    map: str | None         # None also for "map=", which PostgreSQL treats as no map


def _parse_hba_line(fields: list[list[Token]], line_no: int, text: str, *,
                    file: str, supported: frozenset[str]) -> HbaLine:
    rest = iter(fields[1:])
    conntype = _parse_conntype(fields[0])
    databases = _next_or(rest, "end-of-line before database specification")
    users = _next_or(rest, "end-of-line before role specification")
    ip_cmp, ip, hostname = (None, None, None) if conntype == "local" else _parse_address(rest)
    method = _parse_method(_next_or(rest, "end-of-line before authentication method"),
                           conntype, supported)
    options = _parse_options(rest, conntype, method)
    return HbaLine(file=file, line_no=line_no, text=text, conntype=conntype,
                   databases=tuple(databases), users=tuple(users),
                   ip_cmp=ip_cmp, ip=ip, hostname=hostname, method=method, **options)


def _next_or(fields: Iterator[list[Token]], message: str, hint: str | None = None) -> list[Token]:
    field = next(fields, None)
    if field is None:
        raise LineError(message, hint)
    return field


def _parse_conntype(field: list[Token]) -> str:
    token = _single(field, "multiple values specified for connection type",
                    "Specify exactly one connection type per line.")
    if token.string not in _CONNTYPES:
        raise LineError(f'invalid connection type "{token.string}"')
    return token.string


def _parse_address(fields: Iterator[list[Token]]) -> tuple[str, IpRange | None, str | None]:
    token = _single(_next_or(fields, "end-of-line before IP address specification"),
                    "multiple values specified for host address",
                    "Specify one address range per line.")
    for keyword in ("all", "samehost", "samenet"):
        if token.is_keyword(keyword):
            return keyword, None, None
    host, slash, bits = token.string.partition("/")
    address = _address_or_none(host)
    if address is None:
        if slash:
            raise LineError(f'specifying both host name and CIDR mask is invalid: "{token.string}"')
        return "hostname", None, host
    if slash:
        mask = _cidr_mask(bits, address.max_prefixlen)
        if mask is None:
            raise LineError(f'invalid CIDR mask in address "{token.string}"')
    else:
        mask = _separate_mask(fields, address.version)
    return "mask", IpRange(address.version, int(address), mask), None


def _numeric_address(text: str) -> IpAddress:
    """getaddrinfo(AI_NUMERICHOST) as PostgreSQL calls it, so libc decides what is an
    address ("127.1" is).  Raises socket.gaierror."""
    info = socket.getaddrinfo(text.encode("utf-8", "surrogateescape"), None,
                              socket.AF_UNSPEC, 0, 0, socket.AI_NUMERICHOST)
    return ipaddress.ip_address(info[0][4][0].partition("%")[0])


def _address_or_none(text: str) -> IpAddress | None:
    """The address, or None when the text is not numeric: then it is a host name."""
    try:
        return _numeric_address(text)
    except socket.gaierror as e:
        if e.errno == socket.EAI_NONAME:
            return None
        raise LineError(f'invalid IP address "{text}": {e.strerror}') from None


def _cidr_mask(bits: str, width: int) -> int | None:
    # pg_sockaddr_cidr_mask reads the length with strtol: blanks and a sign pass
    if not _STRTOL_DIGITS.fullmatch(bits):
        return None
    n = int(bits)
    if not 0 <= n <= width:
        return None
    return ((1 << n) - 1) << (width - n)


def _separate_mask(fields: Iterator[list[Token]], version: int) -> int:
    field = _next_or(fields, "end-of-line before netmask specification",
                     "Specify an address range in CIDR notation, or provide a separate netmask.")
    token = _single(field, "multiple values specified for netmask")
    try:
        mask = _numeric_address(token.string)
    except socket.gaierror as e:
        raise LineError(f'invalid IP mask "{token.string}": {e.strerror}') from None
    if mask.version != version:
        raise LineError("IP address and mask do not match")
    return int(mask)


def _parse_method(field: list[Token], conntype: str, supported: frozenset[str]) -> str:
    method = _single(field, "multiple values specified for authentication type",
                     "Specify exactly one authentication type per line.").string
    if method not in PG_METHODS:
        raise LineError(f'invalid authentication method "{method}"')
    if conntype == "local" and method == "ident":
        method = "peer"     # PostgreSQL's backwards compatibility for local ident
    if method not in supported:
        raise LineError(f'authentication method "{method}" is not supported by pgfast')
    if conntype != "local" and method == "peer":
        raise LineError("peer authentication is only supported on local sockets")
    if conntype != "hostssl" and method == "cert":
        raise LineError("cert authentication is only supported on hostssl connections")
    return method


def _parse_options(fields: Iterable[list[Token]], conntype: str, method: str) -> dict[str, str | None]:
    options: dict[str, str | None] = {"clientcert": None, "map": None}
    for token in (token for field in fields for token in field):
        name, eq, value = token.string.partition("=")
        if not eq:
            raise LineError(f"authentication option not in name=value format: {token.string}")
        if name == "clientname":
            _check_clientname(value, conntype)
        else:
            options[name] = _option_value(name, value, conntype, method)
    if method == "cert":
        options["clientcert"] = "verify-full"   # cert always checks the certificate's name
    return options


def _option_value(name: str, value: str, conntype: str, method: str) -> str | None:
    if name == "map":
        if method not in _MAP_METHODS:
            raise _invalid_option("map", "ident, peer, gssapi, sspi, and cert")
        return value or None
    if name == "clientcert":
        return _clientcert(value, conntype, method)
    if name in _OTHER_METHOD_OPTIONS:
        raise _invalid_option(name, _OTHER_METHOD_OPTIONS[name])
    raise LineError(f'unrecognized authentication option name: "{name}"')


def _invalid_option(name: str, methods: str) -> LineError:
    return LineError(f'authentication option "{name}" is only valid for authentication methods {methods}')


def _clientcert(value: str, conntype: str, method: str) -> str:
    if conntype != "hostssl":
        raise LineError('clientcert can only be configured for "hostssl" rows')
    if value == "verify-ca" and method == "cert":
        raise LineError('clientcert only accepts "verify-full" when using "cert" authentication')
    if value not in ("verify-ca", "verify-full"):
        raise LineError(f'invalid value for clientcert: "{value}"')
    return value


def _check_clientname(value: str, conntype: str) -> None:
    if conntype != "hostssl":
        raise LineError('clientname can only be configured for "hostssl" rows')
    if value not in ("CN", "DN"):
        raise LineError(f'invalid value for clientname: "{value}"')
    # Certificates are matched on their CN; matching a DN as if it were a CN would admit
    # clients PostgreSQL refuses.
    if value == "DN":
        raise LineError("clientname=DN is not supported by pgfast")


# ---------------------------------------------------------------- matching

@dataclass(frozen=True)
class _Client:
    local: bool
    ssl: bool
    ip: IpAddress | None
    database: str
    user: str
    replication: bool
    roles: frozenset[str] | None
    hostname: str | None


def _is_group(token: Token) -> bool:
    return not token.quoted and token.string.startswith("+")


def _uses_roles(line: HbaLine) -> bool:
    return (any(t.is_keyword("samerole") or t.is_keyword("samegroup") for t in line.databases)
            or any(_is_group(t) for t in line.users))


@dataclass(frozen=True)
class HbaRules:
    lines: tuple[HbaLine, ...]
    needs_roles: bool       # some line uses +group or samerole: match() then needs roles=
    needs_hostname: bool    # some line names a host: match() then needs client_hostname=

    @classmethod
    def from_lines(cls, lines: Iterable[HbaLine]) -> "HbaRules":
        lines = tuple(lines)
        return cls(lines, needs_roles=any(_uses_roles(line) for line in lines),
                   needs_hostname=any(line.ip_cmp == "hostname" for line in lines))

    def match(self, *, local: bool, ssl: bool, address: str | None, database: str, user: str,
              replication: bool = False, roles: frozenset[str] | None = None,
              client_hostname: str | None = None) -> HbaLine | None:
        """The first line that admits this connection (check_hba), or None.

        replication: a physical replication connection (replication=true); a logical
        one (replication=database) is an ordinary connection here, as in PostgreSQL.
        roles: every role the user is a member of, directly or not, including itself
        (is_member_of_role_nosuper); empty when the user does not exist.
        client_hostname: from resolve_client_hostname; None when that failed.
        """
        if not local and address is None:
            raise ValueError("a TCP connection needs its client address")
        ip = None if local else _client_ip(address)
        client = _Client(local, ssl, ip, database, user, replication, roles, client_hostname)
        return next((line for line in self.lines if _line_matches(line, client)), None)


def _line_matches(line: HbaLine, client: _Client) -> bool:
    return (_connection_matches(line, client)
            and any(_database_matches(t, client) for t in line.databases)
            and any(_user_matches(t, client) for t in line.users))


def _connection_matches(line: HbaLine, client: _Client) -> bool:
    if line.conntype == "local" or client.local:
        return line.conntype == "local" and client.local
    if line.conntype == "hostssl" and not client.ssl:
        return False
    if line.conntype == "hostnossl" and client.ssl:
        return False
    if line.conntype == "hostgssenc":
        return False    # pgfast never negotiates GSSAPI encryption
    return _address_matches(line, client)


@functools.lru_cache(maxsize=1024)
def _client_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    # clients come back from few addresses; parsing one is most of a match's cost
    return ipaddress.ip_address(address.partition("%")[0])


def _address_matches(line: HbaLine, client: _Client) -> bool:
    if line.ip_cmp == "all":
        return True
    if line.ip_cmp == "mask":
        return line.ip.contains(client.ip)
    if line.ip_cmp == "hostname":
        return client.hostname is not None and _hostname_matches(line.hostname, client.hostname)
    return any(r.contains(client.ip) for r in _interface_ranges(line.ip_cmp == "samehost"))


def _ascii_lower(s: str) -> str:
    return s.translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _hostname_matches(pattern: str, hostname: str) -> bool:
    # pg_strcasecmp: ASCII case folding only
    if pattern.startswith("."):
        return len(hostname) >= len(pattern) and \
            _ascii_lower(hostname[len(hostname) - len(pattern):]) == _ascii_lower(pattern)
    return _ascii_lower(hostname) == _ascii_lower(pattern)


def _roles(client: _Client) -> frozenset[str]:
    if client.roles is None:
        raise ValueError("pg_hba.conf uses +group or samerole: match() needs roles=")
    return client.roles


def _database_matches(token: Token, client: _Client) -> bool:
    if client.replication:
        return token.is_keyword("replication")  # and nothing else, not even "all"
    if token.is_keyword("all"):
        return True
    if token.is_keyword("sameuser"):
        return client.database == client.user
    if token.is_keyword("samerole") or token.is_keyword("samegroup"):
        return client.database in _roles(client)
    if token.is_keyword("replication"):
        return False
    return token.string == client.database


def _user_matches(token: Token, client: _Client) -> bool:
    if _is_group(token):
        return token.string[1:] in _roles(client)
    return token.string == client.user or token.is_keyword("all")


# ---------------------------------------------------------------- this machine's addresses

class _Sockaddr(ctypes.Structure):
    _fields_ = [("sa_family", ctypes.c_ushort), ("sa_data", ctypes.c_char * 14)]


class _Ifaddrs(ctypes.Structure):
    pass


_Ifaddrs._fields_ = [
    ("ifa_next", ctypes.POINTER(_Ifaddrs)), ("ifa_name", ctypes.c_char_p),
    ("ifa_flags", ctypes.c_uint), ("ifa_addr", ctypes.POINTER(_Sockaddr)),
    ("ifa_netmask", ctypes.POINTER(_Sockaddr)), ("ifa_ifu", ctypes.POINTER(_Sockaddr)),
    ("ifa_data", ctypes.c_void_p),
]
_libc = ctypes.CDLL(None, use_errno=True)
_libc.getifaddrs.argtypes = [ctypes.POINTER(ctypes.POINTER(_Ifaddrs))]
_libc.freeifaddrs.argtypes = [ctypes.POINTER(_Ifaddrs)]
# (offset, size) of the address inside sockaddr_in / sockaddr_in6
_ADDRESS_AT = {socket.AF_INET: (4, 4), socket.AF_INET6: (8, 16)}


def _sockaddr(ptr) -> tuple[int, bytes] | None:
    if not ptr or ptr.contents.sa_family not in _ADDRESS_AT:
        return None
    offset, size = _ADDRESS_AT[ptr.contents.sa_family]
    return ptr.contents.sa_family, ctypes.string_at(ctypes.addressof(ptr.contents) + offset, size)


def _interface_ranges(same_host: bool) -> list[IpRange]:
    """The interfaces as pg_foreach_ifaddr reports them, read afresh each time as
    PostgreSQL does: samehost uses a full mask, samenet the interface's own mask
    (a full one when that is missing or zero)."""
    head = ctypes.POINTER(_Ifaddrs)()
    if _libc.getifaddrs(ctypes.byref(head)) != 0:
        log.log(f"error enumerating network interfaces: {os.strerror(ctypes.get_errno())}")
        return []
    try:
        ranges, node = [], head
        while node:
            ranges.extend(_interface_range(node.contents, same_host))
            node = node.contents.ifa_next
        return ranges
    finally:
        _libc.freeifaddrs(head)


def _interface_range(ifa: _Ifaddrs, same_host: bool) -> list[IpRange]:
    address = _sockaddr(ifa.ifa_addr)
    if address is None:
        return []
    family, raw = address
    full = (1 << (8 * len(raw))) - 1
    netmask = _sockaddr(ifa.ifa_netmask)
    mask = int.from_bytes(netmask[1], "big") if netmask and netmask[0] == family else 0
    if same_host or mask == 0:
        mask = full
    return [IpRange(4 if family == socket.AF_INET else 6, int.from_bytes(raw, "big"), mask)]


def resolve_client_hostname(address: str) -> str | None:
    """The client's host name, or None: a reverse lookup that a forward lookup of
    the name confirms (check_hostname).  Blocking; run it off the event loop."""
    ip = ipaddress.ip_address(address.partition("%")[0])
    sockaddr = (str(ip), 0) if ip.version == 4 else (str(ip), 0, 0, 0)
    try:
        name, _ = socket.getnameinfo(sockaddr, socket.NI_NAMEREQD)
        infos = socket.getaddrinfo(name, None)
    except (OSError, UnicodeError):
        return None
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    for info_family, _, _, _, info_addr in infos:
        if info_family == family and ipaddress.ip_address(info_addr[0].partition("%")[0]) == ip:
            return name
    return None


# ---------------------------------------------------------------- load_hba

def load_hba(path: str, supported_methods: frozenset[str]) -> HbaRules:
    """Parse pg_hba.conf; HbaError for anything PostgreSQL 15 would refuse, and for
    methods pgfast cannot perform (never weakened to another method)."""
    unparseable = supported_methods - _PARSEABLE_METHODS
    if unparseable:
        raise ValueError(f"pgfast cannot read the options of {sorted(unparseable)}")
    try:
        text = read_text(path)
    except OSError as e:
        raise HbaError(f'could not open configuration file "{path}": {e.strerror}') from None

    def parse(fields: list[list[Token]], line_no: int, line: str) -> HbaLine:
        return _parse_hba_line(fields, line_no, line, file=path, supported=supported_methods)

    rules = HbaRules.from_lines(_parse_file(path, text, parse))
    if not rules.lines:
        raise HbaError(f'configuration file "{path}" contains no entries')
    return rules


# ---------------------------------------------------------------- pg_ident.conf

@dataclass(frozen=True)
class IdentLine:
    file: str
    line_no: int
    map_name: str
    system_user: str            # a regular expression when it starts with '/'
    pg_user: str                # may hold \1, replaced by the regex's first group
    regex: re.Pattern | None


@dataclass(frozen=True)
class IdentMap:
    lines: tuple[IdentLine, ...] = ()

    def check(self, map_name: str | None, system_user: str, pg_user: str) -> bool:
        """check_usermap: may system_user log in as pg_user?  Without a map the
        names must be equal.  Logs PostgreSQL's LOG line when the answer is no."""
        if not map_name:
            if system_user == pg_user:
                return True
            log.log(f"provided user name ({pg_user}) and authenticated user name "
                    f"({system_user}) do not match")
            return False
        for line in self.lines:
            if line.map_name != map_name:
                continue
            allowed = _ident_line_allows(line, system_user, pg_user)
            if allowed is None:
                return False    # PostgreSQL stops at a line it cannot evaluate
            if allowed:
                return True
        log.log(f'no match in usermap "{map_name}" for user "{pg_user}" '
                f'authenticated as "{system_user}"')
        return False


def _ident_line_allows(line: IdentLine, system_user: str, pg_user: str) -> bool | None:
    """True/False, or None (after logging) when a \\1 has no group to take."""
    if line.regex is None:
        return line.system_user == system_user and line.pg_user == pg_user
    found = line.regex.search(system_user)
    if found is None:
        return False
    if "\\1" not in line.pg_user:
        return line.pg_user == pg_user
    if line.regex.groups < 1 or found.start(1) < 0:
        log.log(f'regular expression "{line.system_user[1:]}" has no subexpressions as '
                f'requested by backreference in "{line.pg_user}"')
        return None
    return line.pg_user.replace("\\1", found.group(1), 1) == pg_user


def load_ident(path: str) -> IdentMap:
    """Parse pg_ident.conf.  A file that cannot be opened is an empty map, logged,
    as PostgreSQL starts without one; a bad line is an HbaError."""
    try:
        text = read_text(path)
    except OSError as e:
        log.log(f'could not open usermap file "{path}": {e.strerror}')
        return IdentMap()

    def parse(fields: list[list[Token]], line_no: int, line: str) -> IdentLine:
        return _parse_ident_line(fields, line_no, file=path)

    return IdentMap(tuple(_parse_file(path, text, parse)))


def _parse_ident_line(fields: list[list[Token]], line_no: int, *, file: str) -> IdentLine:
    values = []
    for i in range(3):
        if i >= len(fields):
            raise LineError("missing entry at end of line")
        values.append(_single(fields[i], "multiple values in ident field").string)
    map_name, system_user, pg_user = values
    regex = _compile_ident_regex(system_user[1:]) if system_user.startswith("/") else None
    return IdentLine(file, line_no, map_name, system_user, pg_user, regex)


# PostgreSQL compiles these as advanced regular expressions (ARE) in the C collation.
# Python's re agrees on the everyday syntax; these are the spellings that differ.
_ARE_ESCAPES = {"b": "\\x08", "B": "\\\\", "y": "\\b", "Y": "\\B",
                "m": "\\b(?=\\w)", "M": "\\b(?<=\\w)"}
_ARE_BRACKET_ESCAPES = {"B": "\\\\"}
_POSIX_CLASSES = {
    "alnum": "a-zA-Z0-9", "alpha": "a-zA-Z", "blank": " \\t", "cntrl": "\\x00-\\x1f\\x7f",
    "digit": "0-9", "graph": "!-~", "lower": "a-z", "print": " -~",
    "punct": "!-/:-@\\[-`{-~", "space": " \\t\\n\\r\\f\\v", "upper": "A-Z",
    "xdigit": "0-9A-Fa-f",
}


def _compile_ident_regex(pattern: str) -> re.Pattern:
    try:
        # ASCII: the C collation's classes; DOTALL: an ARE '.' matches newlines too
        return re.compile(_are_to_python(pattern), re.ASCII | re.DOTALL)
    except re.error as e:
        raise LineError(f'invalid regular expression "{pattern}": {e}') from None


def _are_to_python(pattern: str) -> str:
    out: list[str] = []
    i, in_bracket = 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            escapes = _ARE_BRACKET_ESCAPES if in_bracket else _ARE_ESCAPES
            out.append(escapes.get(pattern[i + 1], pattern[i:i + 2]))
            i += 2
        elif in_bracket:
            i = _bracket_char(pattern, i, out)
            in_bracket = c != "]"
        elif c == "[":
            i = _bracket_start(pattern, i, out)
            in_bracket = True
        else:
            out.append("\\Z" if c == "$" else c)  # Python's $ would also match before a final \n
            i += 1
    return "".join(out)


def _bracket_start(pattern: str, i: int, out: list[str]) -> int:
    """Copy '[', '^' and a leading ']' (a literal member, in both dialects)."""
    out.append("[")
    i += 1
    if pattern.startswith("^", i):
        out.append("^")
        i += 1
    if pattern.startswith("]", i):
        out.append("\\]")
        i += 1
    return i


def _bracket_char(pattern: str, i: int, out: list[str]) -> int:
    if pattern.startswith("[:", i):
        end = pattern.find(":]", i + 2)
        if end > 0 and pattern[i + 2:end] in _POSIX_CLASSES:
            out.append(_POSIX_CLASSES[pattern[i + 2:end]])
            return end + 2
    out.append("\\[" if pattern[i] == "[" else pattern[i])
    return i + 1
