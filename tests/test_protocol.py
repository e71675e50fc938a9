"""The start-up protocol spoken by hand over raw sockets against a real pgfast:
SSLRequest, GSSENCRequest, direct TLS and ALPN, startup packet framing and layout,
protocol versions, CancelRequest, silence and garbage. One pgfast (ssl = on,
authentication_timeout = 1s) serves the whole module; a second one with ssl = off
serves the one test that needs it."""
from __future__ import annotations

import os
import random
import re
import selectors
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import time

import psycopg
import psycopg.errors
import pytest

import certs
from conftest import Pgfast, chown_tree, free_port, psql

SSL_REQUEST = struct.pack("!II", 8, 80877103)
GSSENC_REQUEST = struct.pack("!II", 8, 80877104)
CANCEL_CODE = 80877102
HBA = """\
local   all all                 trust
hostssl all all 127.0.0.1/32    trust
host    all all 127.0.0.1/32    trust
"""
MITM_DETAIL = ("This could be either a client-software bug or evidence of an attempted "
               "man-in-the-middle attack.")


# ---------------------------------------------------------------- servers

@pytest.fixture(scope="module")
def ca() -> certs.CA:
    return certs.CA("pgfast protocol test CA")


def _start(bindir, template_cluster, scratch_root, ca, name: str, *args: str) -> Pgfast:
    base = tempfile.mkdtemp(prefix=f"protocol-{name}-", dir=scratch_root)
    os.chmod(base, 0o755)
    data = os.path.join(base, "data")
    shutil.copytree(template_cluster, data, symlinks=True)
    os.chmod(data, 0o700)
    with open(os.path.join(data, "pg_hba.conf"), "w") as f:
        f.write(HBA)
    issued = ca.server_cert()
    certs.write(os.path.join(data, "server.crt"), issued.chain_pem(), 0o644)
    certs.write(os.path.join(data, "server.key"), issued.key_pem(), 0o600)
    chown_tree(data)
    socket_dir = tempfile.mkdtemp(prefix="sock-", dir=base)
    os.chmod(socket_dir, 0o777)
    home = os.path.join(base, "home")
    os.mkdir(home)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["HOME"] = home
    server = Pgfast(data, free_port(), socket_dir, list(args), env)
    server.client_env = env
    return server.start()


@pytest.fixture(scope="module")
def server(bindir, template_cluster, scratch_root, ca):
    pgfast = _start(bindir, template_cluster, scratch_root, ca, "tls",
                    "-c", "ssl=on", "-c", "authentication_timeout=1")
    yield pgfast
    pgfast.stop()


@pytest.fixture(scope="module")
def server_without_ssl(bindir, template_cluster, scratch_root, ca):
    pgfast = _start(bindir, template_cluster, scratch_root, ca, "plain", "-c", "ssl=off")
    yield pgfast
    pgfast.stop()


@pytest.fixture(scope="module")
def tls_context(ca) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=ca.cert_pem().decode())
    return ctx


def alpn_context(ca, protocols: list[str] | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=ca.cert_pem().decode())
    if protocols is not None:
        ctx.set_alpn_protocols(protocols)
    return ctx


# ---------------------------------------------------------------- a hand-made client

class ServerError(Exception):
    def __init__(self, fields: dict[str, str]):
        super().__init__(f"{fields.get('C')}: {fields.get('M')}")
        self.fields = fields


def parse_fields(payload: bytes) -> dict[str, str]:
    return {chr(part[0]): part[1:].decode() for part in payload.split(b"\0") if part}


def startup_packet(params: dict[str, str] | list[tuple[str, str]], major: int = 3, minor: int = 0,
                   terminator: bool = True) -> bytes:
    items = params.items() if isinstance(params, dict) else params
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in items) + (b"\0" if terminator else b"")
    return struct.pack("!II", 8 + len(body), major << 16 | minor) + body


def query_message(sql: str) -> bytes:
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!I", 4 + len(body)) + body


class Client:
    """One raw connection; sock may become an ssl.SSLSocket after start_tls()."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()
        self.backend_key: tuple[int, int] | None = None
        self.cancel_key = b""
        self.negotiate: bytes | None = None

    @classmethod
    def tcp(cls, server: Pgfast, timeout: float = 5) -> "Client":
        return cls(socket.create_connection(("127.0.0.1", server.port), timeout=timeout))

    @classmethod
    def unix(cls, server: Pgfast, timeout: float = 5) -> "Client":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(os.path.join(server.socket_dir, f".s.PGSQL.{server.port}"))
        return cls(sock)

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("server closed the connection")
        self.buf += chunk

    def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def message(self) -> tuple[bytes, bytes]:
        msg_type = self.read(1)
        (length,) = struct.unpack("!I", self.read(4))
        return msg_type, self.read(length - 4)

    def start_tls(self, ctx: ssl.SSLContext) -> None:
        assert not self.buf
        self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")

    def ssl_request(self, ctx: ssl.SSLContext) -> None:
        self.send(SSL_REQUEST)
        assert self.read(1) == b"S"
        self.start_tls(ctx)

    def startup(self, params: dict[str, str] | None = None, packet: bytes | None = None) -> None:
        """Send a StartupMessage and read up to ReadyForQuery; ServerError on an ErrorResponse."""
        self.send(packet if packet is not None else startup_packet(params or {"user": "postgres"}))
        self.read_until_ready()

    def read_until_ready(self) -> list[tuple[bytes, bytes]]:
        messages = []
        error = None
        while True:
            msg_type, payload = self.message()
            messages.append((msg_type, payload))
            if msg_type == b"K":
                self.backend_key = struct.unpack_from("!iI", payload)
                self.cancel_key = payload[4:]       # 4 bytes for 3.0 and 3.1, 32 for 3.2
            elif msg_type == b"v":
                self.negotiate = payload
            elif msg_type == b"E":
                error = ServerError(parse_fields(payload))
                if not self.backend_key:        # during start-up an error is the end
                    raise error
            elif msg_type == b"Z":
                if error is not None:
                    raise error
                return messages

    def query(self, sql: str) -> list[tuple[str | None, ...]]:
        self.send(query_message(sql))
        rows = []
        for msg_type, payload in self.read_until_ready():
            if msg_type == b"D":
                (count,) = struct.unpack_from("!H", payload)
                pos, row = 2, []
                for _ in range(count):
                    (size,) = struct.unpack_from("!i", payload, pos)
                    pos += 4
                    row.append(None if size < 0 else payload[pos:pos + size].decode())
                    pos += max(size, 0)
                rows.append(tuple(row))
        return rows

    def wait_closed(self, timeout: float = 5) -> tuple[bytes, float]:
        """(everything received until the server closed, seconds it took)."""
        start = time.monotonic()
        received = bytes(self.buf)
        self.buf.clear()
        self.sock.settimeout(timeout)
        while True:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError):
                chunk = b""
            except (socket.timeout, TimeoutError):
                raise AssertionError(f"server still had the connection open after {timeout} s "
                                     f"(received {received!r})") from None
            if not chunk:
                return received, time.monotonic() - start
            received += chunk

    def expect_fatal(self) -> dict[str, str]:
        """One FATAL ErrorResponse, then the end of the connection."""
        msg_type, payload = self.message()
        assert msg_type == b"E", (msg_type, payload)
        fields = parse_fields(payload)
        assert fields["S"] == fields["V"] == "FATAL", fields
        rest, _ = self.wait_closed()
        assert rest == b"", rest
        return fields


def log_mark(server: Pgfast) -> int:
    return len(server.lines)


def wait_log(server: Pgfast, mark: int, text: str, timeout: float = 5) -> str:
    deadline = time.monotonic() + timeout
    while True:
        recent = "".join(server.lines[mark:])
        if text in recent or time.monotonic() > deadline:
            assert text in recent, f"{text!r} not in the log since the test began:\n{recent}"
            return recent
        time.sleep(0.02)


def fatal(server: Pgfast, data: bytes) -> tuple[dict[str, str], int]:
    """Send data on a new connection; the FATAL it earns and the log mark before it."""
    mark = log_mark(server)
    client = Client.tcp(server)
    try:
        client.send(data)
        return client.expect_fatal(), mark
    finally:
        client.close()


def assert_serving(server: Pgfast, ctx: ssl.SSLContext) -> None:
    client = Client.tcp(server)
    try:
        client.ssl_request(ctx)
        client.startup({"user": "postgres", "database": "postgres"})
        assert client.query("select 6 * 7") == [("42",)]
    finally:
        client.close()


# ---------------------------------------------------------------- SSLRequest

def test_bytes_after_ssl_request_in_the_same_send(server):
    fields, mark = fatal(server, SSL_REQUEST + startup_packet({"user": "postgres"}))
    # plaintext: the refusal comes instead of 'S', never after a handshake
    assert (fields["C"], fields["M"], fields["D"]) == (
        "08P01", "received unencrypted data after SSL request", MITM_DETAIL)
    log = wait_log(server, mark, "FATAL:  received unencrypted data after SSL request")
    assert f"DETAIL:  {MITM_DETAIL}" in log


def test_ssl_request_then_session(server, tls_context):
    client = Client.tcp(server)
    client.ssl_request(tls_context)
    assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
    client.startup({"user": "postgres"})
    assert client.query("select current_user, current_database()") == [("postgres", "postgres")]
    client.close()


def test_gssenc_request_then_ssl_request(server, tls_context):
    client = Client.tcp(server)
    client.send(GSSENC_REQUEST)
    assert client.read(1) == b"N"
    client.ssl_request(tls_context)
    client.startup({"user": "postgres"})
    assert client.query("select 2") == [("2",)]
    client.close()


def test_second_gssenc_request_is_an_unsupported_protocol(server):
    client = Client.tcp(server)
    client.send(GSSENC_REQUEST)
    assert client.read(1) == b"N"
    client.send(GSSENC_REQUEST)
    fields = client.expect_fatal()
    assert (fields["C"], fields["M"]) == ("0A000", "unsupported frontend protocol 1234.5680: server supports 3.0 to 3.2")
    client.close()


def test_second_ssl_request_after_n_is_an_unsupported_protocol(server):
    client = Client.unix(server)
    client.send(SSL_REQUEST)
    assert client.read(1) == b"N"
    client.send(SSL_REQUEST)
    fields = client.expect_fatal()
    assert (fields["C"], fields["M"]) == ("0A000", "unsupported frontend protocol 1234.5679: server supports 3.0 to 3.2")
    client.close()


def test_ssl_request_on_the_unix_socket_is_refused_with_n(server):
    client = Client.unix(server)
    client.send(SSL_REQUEST)
    assert client.read(1) == b"N"
    client.startup({"user": "postgres"})
    assert client.query("select 3") == [("3",)]
    client.close()


def test_ssl_request_with_ssl_off_is_refused_with_n(server_without_ssl):
    client = Client.tcp(server_without_ssl)
    client.send(SSL_REQUEST)
    assert client.read(1) == b"N"
    client.startup({"user": "postgres"})
    assert client.query("select 4") == [("4",)]
    client.close()


# ---------------------------------------------------------------- direct TLS

def test_direct_tls_with_alpn(server, ca):
    client = Client.tcp(server)
    client.start_tls(alpn_context(ca, ["postgresql"]))
    assert client.sock.selected_alpn_protocol() == "postgresql"
    client.startup({"user": "postgres"})
    assert client.query("select 'direct'") == [("direct",)]
    client.close()


def test_direct_tls_without_alpn(server, ca):
    mark = log_mark(server)
    client = Client.tcp(server)
    client.start_tls(alpn_context(ca, None))       # the handshake itself succeeds
    fields = client.expect_fatal()                 # and the refusal comes inside TLS
    assert (fields["C"], fields["M"]) == (
        "08P01", "received direct SSL connection request without ALPN protocol negotiation extension")
    client.close()
    wait_log(server, mark, "FATAL:  received direct SSL connection request without ALPN protocol "
                           "negotiation extension")


def test_direct_tls_with_another_alpn_protocol(server, ca):
    client = Client.tcp(server)
    with pytest.raises(ssl.SSLError) as caught:
        client.start_tls(alpn_context(ca, ["http/1.1"]))
    assert "alert no application protocol" in str(caught.value), caught.value
    client.close()


# ---------------------------------------------------------------- startup packet framing

@pytest.mark.parametrize("length", [0, 7, 10005, 2**31, 2**32 - 1])
def test_invalid_startup_packet_length(server, length):
    # the length word alone earns the refusal: nothing more is sent or waited for
    fields, mark = fatal(server, struct.pack("!I", length))
    assert (fields["C"], fields["M"]) == ("08P01", "invalid length of startup packet")
    wait_log(server, mark, "FATAL:  invalid length of startup packet")


@pytest.mark.parametrize("length", [8 + 1000, 10000, 10004])
def test_long_startup_packets_are_accepted(server, length):
    """ProcessStartupPacket takes up to 10000 bytes after the length word: 10004 in all."""
    head = startup_packet([("user", "postgres"), ("application_name", "")])
    padding = length - len(head)
    packet = startup_packet([("user", "postgres"), ("application_name", "p" * padding)])
    assert len(packet) == length
    client = Client.tcp(server)
    client.startup(packet=packet)
    assert client.query("select current_user") == [("postgres",)]
    client.close()


def test_startup_packet_of_10001_is_a_length_postgresql_accepts(server):
    """PostgreSQL's limit is on what follows the length word (10000 bytes), so 10001 is a
    length it reads the packet for; this one then lacks its terminator."""
    fields, _ = fatal(server, struct.pack("!II", 10001, 196608) + b"x" * 9993)
    assert fields["M"] == "invalid startup packet layout: expected terminator as last byte"


def test_startup_packet_split_into_single_bytes(server):
    client = Client.tcp(server)
    for byte in startup_packet({"user": "postgres", "database": "postgres"}):
        client.send(bytes([byte]))
    client.read_until_ready()
    assert client.query("select 5") == [("5",)]
    client.close()


@pytest.mark.parametrize("major,minor", [(2, 0), (4, 0), (1234, 5681), (0, 0)])
def test_unsupported_protocol(server, major, minor):
    fields, mark = fatal(server, startup_packet({"user": "postgres"}, major=major, minor=minor))
    text = f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.2"
    assert (fields["C"], fields["M"]) == ("0A000", text)
    wait_log(server, mark, f"FATAL:  {text}")


def test_protocol_3_1_and_pq_options_are_negotiated(server):
    client = Client.tcp(server)
    client.startup(packet=startup_packet([("user", "postgres"), ("_pq_.foo", "bar")], minor=1))
    version, count = struct.unpack_from("!ii", client.negotiate)
    assert (version, count) == (3 << 16 | 1, 1)     # PostgreSQL 18: the version asked for
    assert client.negotiate[8:] == b"_pq_.foo\0"
    assert client.query("select 7") == [("7",)]
    client.close()


def test_pq_option_alone_with_protocol_3_0(server):
    client = Client.tcp(server)
    client.startup(packet=startup_packet([("_pq_.a", "1"), ("user", "postgres"), ("_pq_.b", "2")]))
    assert client.negotiate == struct.pack("!ii", 3 << 16, 2) + b"_pq_.a\0_pq_.b\0"
    assert client.query("select 8") == [("8",)]
    client.close()


@pytest.mark.parametrize("minor", [1, 2])
def test_protocol_3_1_and_3_2_without_options_need_no_negotiation(server, minor):
    client = Client.tcp(server)
    client.startup(packet=startup_packet({"user": "postgres"}, minor=minor))
    assert client.negotiate is None
    assert len(client.cancel_key) == (32 if minor == 2 else 4)    # as PostgreSQL 18 gives them
    assert client.query("select 9") == [("9",)]
    client.close()


def test_greased_version_and_options_are_negotiated_to_3_2(server):
    """What PostgreSQL 19's libpq sends to test servers: a version of 3.9990-3.9999 and
    made-up _pq_ options. The answer: 3.2 and the options' names, and the session goes on."""
    client = Client.tcp(server)
    client.startup(packet=startup_packet([("user", "postgres"), ("_pq_.grease_1", "x"),
                                          ("_pq_.test_protocol_negotiation", "")], minor=9999))
    assert client.negotiate == struct.pack("!ii", 3 << 16 | 2, 2) + b"_pq_.grease_1\0_pq_.test_protocol_negotiation\0"
    assert len(client.cancel_key) == 32
    assert client.query("select 10") == [("10",)]
    client.close()


@pytest.mark.parametrize("packet", [
    startup_packet({"user": "postgres"}, terminator=False),
    struct.pack("!II", 8, 196608),                                       # no parameters, no terminator
    startup_packet({"user": "postgres"}, terminator=False) + b"\0\0",    # bytes after the terminator
    struct.pack("!II", 13, 196608) + b"user\0",                          # a name without a value
])
def test_startup_packet_layout(server, packet):
    fields, mark = fatal(server, packet)
    assert (fields["C"], fields["M"]) == (
        "08P01", "invalid startup packet layout: expected terminator as last byte")
    wait_log(server, mark, "FATAL:  invalid startup packet layout: expected terminator as last byte")


@pytest.mark.parametrize("params", [{}, {"database": "postgres"}, {"user": ""}])
def test_no_user_name(server, params):
    fields, mark = fatal(server, startup_packet(params))
    assert (fields["C"], fields["M"]) == ("28000", "no PostgreSQL user name specified in startup packet")
    wait_log(server, mark, "FATAL:  no PostgreSQL user name specified in startup packet")


def test_layout_and_user_errors_inside_tls(server, tls_context):
    client = Client.tcp(server)
    client.ssl_request(tls_context)
    client.send(startup_packet({"database": "postgres"}))
    fields = client.expect_fatal()
    assert (fields["C"], fields["M"]) == ("28000", "no PostgreSQL user name specified in startup packet")
    client.close()


# ---------------------------------------------------------------- garbage and silence

def test_garbage_is_refused_or_dropped(server, tls_context):
    rng = random.Random(20261128)
    payloads = [rng.randbytes(rng.choice([1, 3, 4, 5, 8, 12, 100, 5000, 70000])) for _ in range(40)]
    payloads += [b"\x16" + rng.randbytes(200), b"\x16\x03\x01\x00\x05hello", b"GET / HTTP/1.1\r\n\r\n",
                 b"\0" * 8, b"\xff" * 16, SSL_REQUEST + b"\x16\x03\x01" + rng.randbytes(60)]
    selector = selectors.DefaultSelector()
    start = time.monotonic()
    for payload in payloads:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        try:
            sock.sendall(payload)
        except (ConnectionResetError, BrokenPipeError):
            pass                                   # refused before it had all been sent
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, payload)
    open_socks = len(payloads)
    while open_socks and time.monotonic() - start < 6:
        for key, _ in selector.select(timeout=0.5):
            try:
                chunk = key.fileobj.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                selector.unregister(key.fileobj)
                key.fileobj.close()
                open_socks -= 1
    left = [key.data[:20] for key in selector.get_map().values()]
    selector.close()
    assert not left, f"connections still open after {time.monotonic() - start:.1f} s: {left}"
    assert server.process.poll() is None
    assert_serving(server, tls_context)


def _silent_client(server, tls_context, ca, how: str) -> Client:
    client = Client.tcp(server)
    if how == "half startup packet":
        client.send(startup_packet({"user": "postgres"})[:9])
    elif how == "half length word":
        client.send(b"\0\0")
    elif how == "TLS handshake then nothing":
        client.ssl_request(tls_context)
    elif how == "TLS handshake then half a packet":
        client.ssl_request(tls_context)
        client.send(startup_packet({"user": "postgres"})[:-3])
    elif how == "SSLRequest then no handshake":
        client.send(SSL_REQUEST)
        assert client.read(1) == b"S"
    elif how == "direct TLS handshake then nothing":
        client.start_tls(alpn_context(ca, ["postgresql"]))
    return client


@pytest.mark.parametrize("how", ["nothing", "half length word", "half startup packet", "SSLRequest then no handshake",
                                 "TLS handshake then nothing", "TLS handshake then half a packet",
                                 "direct TLS handshake then nothing"])
def test_silent_clients_are_dropped_after_authentication_timeout(server, tls_context, ca, how):
    start = time.monotonic()                       # pgfast's clock starts at the connection
    client = _silent_client(server, tls_context, ca, how)
    received, _ = client.wait_closed(timeout=5)
    elapsed = time.monotonic() - start
    assert received == b""                         # PostgreSQL's startup timeout says nothing
    assert 0.9 <= elapsed <= 3, elapsed
    client.close()


def test_eof_during_startup_packet_is_logged(server):
    mark = log_mark(server)
    client = Client.tcp(server)
    client.send(startup_packet({"user": "postgres"})[:10])
    client.sock.shutdown(socket.SHUT_WR)
    assert client.wait_closed()[0] == b""
    client.close()
    wait_log(server, mark, "LOG:  incomplete startup packet")


# ---------------------------------------------------------------- CancelRequest

def cancel_packet(pid: int, key: int, length: int = 16) -> bytes:
    body = struct.pack("!iI", pid, key)
    return struct.pack("!II", length, CANCEL_CODE) + (body + b"\0" * 8)[:length - 8]


def sleeping_session(server: Pgfast, tls_context: ssl.SSLContext, use_tls: bool) -> Client:
    client = Client.tcp(server, timeout=10)
    if use_tls:
        client.ssl_request(tls_context)
    client.startup({"user": "postgres"})
    pid, _key = client.backend_key
    assert client.query("select pg_backend_pid()") == [(str(pid),)]
    client.send(query_message("select pg_sleep(30)"))
    wait_until_sleeping(server, tls_context, pid)
    return client


def wait_until_sleeping(server, tls_context, pid: int) -> None:
    observer = Client.tcp(server)
    observer.startup({"user": "postgres"})
    deadline = time.monotonic() + 5
    while observer.query(f"select wait_event from pg_stat_activity where pid = {pid}") != [("PgSleep",)]:
        assert time.monotonic() < deadline, "the session never started sleeping"
        time.sleep(0.02)
    observer.close()


def send_cancel(server, tls_context, packet: bytes, use_tls: bool) -> bytes:
    """Send a CancelRequest on a new connection; what came back before the server closed."""
    client = Client.tcp(server)
    if use_tls:
        client.ssl_request(tls_context)
    client.send(packet)
    received, _ = client.wait_closed()
    client.close()
    return received


def expect_cancelled(client: Client) -> None:
    with pytest.raises(ServerError) as caught:
        client.read_until_ready()
    assert (caught.value.fields["C"], caught.value.fields["M"]) == (
        "57014", "canceling statement due to user request")
    assert client.query("select 'still here'") == [("still here",)]


def still_running(client: Client, seconds: float) -> bool:
    """True when the session sends nothing for this long (anything it does send is kept)."""
    client.sock.settimeout(seconds)
    try:
        chunk = client.sock.recv(65536)
    except (socket.timeout, TimeoutError):
        return True
    finally:
        client.sock.settimeout(10)
    client.buf += chunk
    return False


@pytest.mark.parametrize("cancel_over_tls", [False, True], ids=["plain-cancel", "tls-cancel"])
@pytest.mark.parametrize("session_over_tls", [False, True], ids=["plain-session", "tls-session"])
def test_cancel_request(server, tls_context, session_over_tls, cancel_over_tls):
    client = sleeping_session(server, tls_context, session_over_tls)
    pid, key = client.backend_key
    assert send_cancel(server, tls_context, cancel_packet(pid, key), cancel_over_tls) == b""
    expect_cancelled(client)
    client.close()


def test_cancel_with_wrong_key_or_pid_does_nothing(server, tls_context):
    client = sleeping_session(server, tls_context, use_tls=True)
    pid, key = client.backend_key
    mark = log_mark(server)
    assert send_cancel(server, tls_context, cancel_packet(pid, key ^ 0x5A5A), use_tls=False) == b""
    wait_log(server, mark, f"LOG:  wrong key in cancel request for process {pid}")
    assert send_cancel(server, tls_context, cancel_packet(pid + 100000, key), use_tls=True) == b""
    wait_log(server, mark, f"LOG:  PID {pid + 100000} in cancel request did not match any process")
    assert still_running(client, 1.0)
    assert send_cancel(server, tls_context, cancel_packet(pid, key), use_tls=False) == b""
    expect_cancelled(client)
    client.close()


@pytest.mark.parametrize("length", [8, 12, 15, 17, 20])
def test_cancel_request_of_the_wrong_length(server, tls_context, length):
    client = sleeping_session(server, tls_context, use_tls=False)
    pid, key = client.backend_key
    received = send_cancel(server, tls_context, cancel_packet(pid, key, length), use_tls=False)
    assert received == b"" or received[:1] == b"E"
    if received:
        fields = parse_fields(received[5:])
        assert (fields["C"], fields["M"]) == ("08P01", "invalid length of cancel request packet")
    assert still_running(client, 0.3)
    assert send_cancel(server, tls_context, cancel_packet(pid, key), use_tls=False) == b""
    expect_cancelled(client)
    client.close()


def test_protocol_3_2_cancel_keys_are_32_bytes(server, tls_context):
    """A 3.2 session's key is 32 random bytes; a CancelRequest must carry all of them:
    a wrong one (of the same length, or the right one cut to 4 bytes) does nothing."""
    client = Client.tcp(server, timeout=10)
    client.ssl_request(tls_context)
    client.startup(packet=startup_packet({"user": "postgres", "database": "postgres"}, minor=2))
    pid, key = client.backend_key[0], client.cancel_key
    assert len(key) == 32
    client.send(query_message("select pg_sleep(30)"))
    wait_until_sleeping(server, tls_context, pid)
    wrong = bytes(b ^ 0xFF for b in key)
    mark = log_mark(server)
    for bad in (wrong, key[:4]):
        packet = struct.pack("!II", 12 + len(bad), CANCEL_CODE) + struct.pack("!i", pid) + bad
        assert send_cancel(server, tls_context, packet, use_tls=False) == b""
    wait_log(server, mark, f"LOG:  wrong key in cancel request for process {pid}")
    assert still_running(client, 0.5)
    packet = struct.pack("!II", 12 + len(key), CANCEL_CODE) + struct.pack("!i", pid) + key
    assert send_cancel(server, tls_context, packet, use_tls=True) == b""
    expect_cancelled(client)
    client.close()


def test_libpq_18_speaks_3_2_and_cancels(server):
    """psycopg's own libpq (18 on current wheels) asked for protocol 3.2."""
    if psycopg.pq.version() < 180000:
        pytest.skip(f"psycopg's libpq is {psycopg.pq.version()}, before 3.2")
    with psycopg.connect(host="127.0.0.1", port=server.port, user="postgres", dbname="postgres",
                         sslmode="require", max_protocol_version="3.2", autocommit=True) as conn:
        assert conn.pgconn.full_protocol_version == 30002
        assert conn.execute("select 1").fetchone() == (1,)
        timer = threading.Timer(0.3, conn.cancel_safe)
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(30)")
        timer.join()
        assert conn.execute("select 2").fetchone() == (2,)


def _private_postgres_socket(server: Pgfast) -> str:
    with open(os.path.join(server.data_dir, "postmaster.pid")) as f:
        lines = f.read().splitlines()
    return os.path.join(lines[4], f".s.PGSQL.{lines[3]}")      # socket directory, port


def test_pgfast_hands_out_its_own_cancel_keys(server, tls_context):
    """The key in BackendKeyData is pgfast's, not PostgreSQL's: sent straight to PostgreSQL
    (its private socket, reachable here only because the tests may run as root or as the
    database user) it is a wrong key; sent to pgfast it cancels."""
    client = sleeping_session(server, tls_context, use_tls=True)
    pid, key = client.backend_key
    private = _private_postgres_socket(server)
    mark = log_mark(server)
    direct = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    direct.settimeout(5)
    direct.connect(private)
    direct.sendall(cancel_packet(pid, key))
    assert direct.recv(100) == b""
    direct.close()
    log = wait_log(server, mark, f"LOG:  wrong key in cancel request for process {pid}")
    assert not re.search(rf"\[{server.process.pid}\] (\S+ )?LOG:  wrong key", log)     # PostgreSQL said it, not pgfast
    assert still_running(client, 0.5)
    assert send_cancel(server, tls_context, cancel_packet(pid, key), use_tls=True) == b""
    expect_cancelled(client)
    client.close()


# ---------------------------------------------------------------- afterwards

def test_zz_after_all_no_traceback_and_still_serving(server, tls_context, bindir):
    assert server.process.poll() is None
    result = psql(bindir, server.dsn(sslmode="require"), "select 'alive'", server.client_env)
    assert (result.returncode, result.stdout.strip()) == (0, "alive"), result.stderr
    assert_serving(server, tls_context)
    for sign in ("Traceback", "Exception in callback", "exception was never retrieved", "Error:"):
        assert sign not in server.log, server.log
