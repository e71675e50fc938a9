"""Hostile input at the network level against a real pgfast: seeded, reproducible batches of
garbage, mutated and truncated packets, abrupt closes (FIN and RST) and corrupted TLS records,

  1. before TLS, in the first plaintext packets (SSLRequest, GSSENCRequest, CancelRequest,
     StartupMessage), and RSTs at random points of whole logins;
  2. inside TLS before the StartupMessage (after an SSLRequest and direct), TLS records
     corrupted on the wire (a fatal alert must come back), renegotiation;
  3. during the SCRAM exchange, and in a logged-in session (plaintext and TLS).

After each batch pgfast must still run and serve a normal client (psycopg, sslmode=require)
at once, no backend may be left busy by a client that went away, and (in session batches) the
pooled backends the next clients get must be clean. At the end every session slot must be
free again, the log must hold no Python traceback or asyncio complaint, and every FATAL
pgfast wrote must be one of PostgreSQL's wordings.

Every connection of a batch is a Case (what is sent, in order, and how the client ends); a
failing batch names its cases with the bytes they sent, so each failure is a reproducer.
Random batches use random.Random(f"{SEED}-{batch name}"); PGFAST_HOSTILE_SEED=n explores
further. (What a TLS client sends still differs from run to run: its randoms and key shares.)

Servers (each ssl = on, authentication_timeout = 2s, the same pg_hba.conf): `server` (two
worker processes) takes the batches; `tx_server` takes the session batches once more for a
role with pgfast.pool_mode = transaction (ALTER ROLE SET), with its own log check; and
`defect_server` (one worker) runs the reproducers of the defects these batches found (each
asserting what PostgreSQL 15 does with the same bytes; all fixed), so that what they make
pgfast log hides nothing in the other logs.
"""
from __future__ import annotations

import base64
import binascii
import concurrent.futures
import dataclasses
import os
import random
import re
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time

import psycopg
import pytest
import scramp
from OpenSSL import SSL

import certs
from conftest import READY, Pgfast, append_conf, chown_tree, client_environment, free_port, psql_script, write_file
from rawclient import (FLUSH, SSL_REQUEST, SYNC, TERMINATE, RawClient, bind, error_fields, execute, message,
                       parse, query_message, startup_packet)

SEED = int(os.environ.get("PGFAST_HOSTILE_SEED", "20261201"))   # another seed explores further
AUTH_TIMEOUT = 2.0                      # authentication_timeout of both servers
PREAUTH_DEADLINE = AUTH_TIMEOUT + 2.5   # a client not logged in is let go by then, whatever it sent
SESSION_DEADLINE = 3.0                  # a session whose stream broke is closed by then
WORKERS = 24                            # connections of a batch in flight at once
MAX_CONNECTIONS = 100

GSSENC_REQUEST = struct.pack("!II", 8, 80877104)
CANCEL_CODE = 80877102
SSL_CODE = 80877103
GSSENC_CODE = 80877104
SCRAM_ROLE, SCRAM_PASSWORD = "hostile_scram", "hostile-secret"
SCRAM_DATABASE = "hostile_scramdb"     # any user, scram-sha-256 (the database need not exist)
TX_ROLE = "hostile_tx"                 # trust, pgfast.pool_mode = transaction (ALTER ROLE SET)
HBA = f"""\
local all all trust
host all {SCRAM_ROLE} 127.0.0.1/32 scram-sha-256
host {SCRAM_DATABASE} all 127.0.0.1/32 scram-sha-256
host all all 127.0.0.1/32 trust
"""
MITM_DETAIL = ("This could be either a client-software bug or evidence of an attempted "
               "man-in-the-middle attack.")
VALID_STARTUP = startup_packet({"user": "postgres", "database": "postgres", "application_name": "hostile"})

# What pgfast itself may say as a FATAL (to the client and in its log): PostgreSQL's wordings
# for what a hostile client can cause.
PGFAST_FATALS = [re.compile(p) for p in (
    r"invalid length of startup packet",
    r"unsupported frontend protocol \d+\.\d+: server supports 3\.0 to 3\.2",
    r"received unencrypted data after SSL request",
    r"invalid startup packet layout: expected terminator as last byte",
    r"no PostgreSQL user name specified in startup packet",
    r"invalid length of cancel request packet",
    r"canceling authentication due to timeout",
    r'password authentication failed for user ".*"',
    r"expected (password|SASL) response, got message type \d+",
    r"malformed SCRAM message",
    r"invalid SCRAM response",
    r"client selected an invalid SASL authentication mechanism",
    r"insufficient data left in message",
    r"invalid message format",
    r"invalid string in message",
    r"invalid frontend message type \d+",       # what transaction pooling frames itself
    r'unsupported SCRAM channel-binding type ".*"',
    r"client uses authorization identity, but it is not supported",
    r"client requires an unsupported SCRAM extension",
    r"SCRAM channel binding negotiation error",
    r"SCRAM channel binding check failed",
    r"non-printable characters in SCRAM nonce",
    r"unexpected SCRAM channel-binding attribute in client-final-message",
    r"empty password returned by client",
    r"invalid password packet size",
    r'invalid value for parameter "replication": ".*"',
    r"received direct SSL connection request without ALPN protocol negotiation extension",
    r'no pg_hba.conf entry for host ".*", user ".*", database ".*", (SSL encryption|no encryption)',
    r"sorry, too many clients already",
)]
# Backend message types a client may legitimately receive from a session.
BACKEND_TYPES = set(b"123ACDEGHIKNRSTVWZcdnstv")
# Types PostgreSQL answers with "invalid frontend message type": not a frontend message in a
# session, not CopyData/CopyDone/CopyFail (ignored outside COPY), and not Terminate.
UNKNOWN_TYPES = sorted(set(range(256)) - set(b"BCDEFHPQSXcdfp"))


# ---------------------------------------------------------------- servers

@pytest.fixture(scope="module")
def ca() -> certs.CA:
    return certs.CA("pgfast hostile-input test CA")


class TolerantPgfast(Pgfast):
    """conftest's Pgfast, with a log reader that survives bytes that are not UTF-8:
    PostgreSQL logs a role or database name a client sent as it came (role "postgr\\xe9s"
    does not exist), and conftest's text-mode reader thread dies on it, after which nobody
    drains the pipe and every later log line is missing."""

    def start(self, wait: bool = True, timeout: float = 60) -> "TolerantPgfast":
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, env=self.env, text=True,
                                        errors="backslashreplace")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait:
            self.wait_for(f"[{self.process.pid}] {READY}", timeout)
        return self


def _start_server(template_cluster, module_dir, bindir, ca, name: str, conf: str = "") -> Pgfast:
    base = tempfile.mkdtemp(prefix=f"hostile-{name}-", dir=module_dir)
    os.chmod(base, 0o755)
    data = os.path.join(base, "data")
    shutil.copytree(template_cluster, data, symlinks=True)
    os.chmod(data, 0o700)
    write_file(os.path.join(data, "pg_hba.conf"), HBA)
    append_conf(data, f"ssl = on\nauthentication_timeout = {int(AUTH_TIMEOUT)}s\nmax_connections = {MAX_CONNECTIONS}\n{conf}")
    issued = ca.server_cert()
    certs.write(os.path.join(data, "server.crt"), issued.chain_pem(), 0o644)
    certs.write(os.path.join(data, "server.key"), issued.key_pem(), 0o600)
    chown_tree(data)
    socket_dir = tempfile.mkdtemp(prefix="sock-", dir=base)
    os.chmod(socket_dir, 0o777)
    env = client_environment(os.path.join(base, "home"))
    server = TolerantPgfast(data, free_port(), socket_dir, [], env).start()
    server.ca_file = certs.write(os.path.join(base, "ca.crt"), ca.cert_pem(), 0o644)
    result = psql_script(bindir, server, f"create role {SCRAM_ROLE} login password '{SCRAM_PASSWORD}';\n"
                                         f"create role {TX_ROLE} login;\n"
                                         f"alter role {TX_ROLE} set pgfast.pool_mode = 'transaction';\n"
                                         "create table hostile_copy (line text);\n"
                                         f"grant all on hostile_copy to {TX_ROLE};\n", env)
    assert result.returncode == 0, f"{result.stderr}\n{server.log}"
    server.pgfast_pids = pgfast_pids(server)
    return server


def pgfast_pids(server: Pgfast) -> set[int]:
    """pgfast's processes: the one started, and its children but PostgreSQL's postmaster
    (with pgfast.workers > 1, the workers), to tell pgfast's log lines from PostgreSQL's."""
    root = server.process.pid
    with open(os.path.join(server.data_dir, "postmaster.pid")) as f:
        postmaster = int(f.readline())
    pids = {root}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == postmaster:
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == root:
            pids.add(int(entry))
    return pids


@pytest.fixture(scope="module")
def server(template_cluster, module_dir, bindir, ca):
    """The server of the batches: two worker processes (pgfast's default on two cores) under
    the supervisor, so the shared counters and a worker's death are in play too."""
    pgfast = _start_server(template_cluster, module_dir, bindir, ca, "main", "pgfast.workers = 2")
    yield pgfast
    pgfast.stop()


@pytest.fixture(scope="module")
def tx_server(template_cluster, module_dir, bindir, ca):
    """For the session batches under transaction pooling (their log is checked on its own)."""
    pgfast = _start_server(template_cluster, module_dir, bindir, ca, "transaction")
    yield pgfast
    pgfast.stop()


@pytest.fixture(scope="module")
def defect_server(template_cluster, module_dir, bindir, ca):
    """For the reproducers of known defects only (their log is not checked). One worker
    process, so that what a reproducer arranges on one connection holds for the next."""
    pgfast = _start_server(template_cluster, module_dir, bindir, ca, "defects", "pgfast.workers = 1")
    yield pgfast
    pgfast.stop()


@pytest.fixture(scope="module")
def tls_context(ca) -> ssl.SSLContext:
    return client_context(ca)


@pytest.fixture(scope="module")
def direct_context(ca) -> ssl.SSLContext:
    ctx = client_context(ca)
    ctx.set_alpn_protocols(["postgresql"])
    return ctx


def client_context(ca: certs.CA, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=ca.cert_pem().decode())
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


# ---------------------------------------------------------------- after every batch

def normal_connect(server: Pgfast) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=server.port, user="postgres", dbname="postgres",
                           sslmode="require", sslrootcert=server.ca_file, connect_timeout=5, autocommit=True)


def assert_serving(server: Pgfast) -> None:
    """pgfast runs, serves a normal client at once, and no hostile client left a backend
    busy (in a query, a transaction or a COPY): each such session was closed, not kept."""
    assert server.process.poll() is None, f"pgfast exited with status {server.process.returncode}"
    restarts = [line for line in server.lines if "; starting it again" in line or "pgfast worker" in line]
    assert not restarts, f"pgfast worker processes died: {restarts}"
    start = time.monotonic()
    with normal_connect(server) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        assert time.monotonic() - start < 5, f"a normal client needed {time.monotonic() - start:.1f} s"
        deadline = time.monotonic() + SESSION_DEADLINE
        while True:
            busy = conn.execute(
                "select pid, state, left(query, 60) from pg_stat_activity where backend_type = 'client backend' "
                "and pid <> pg_backend_pid() and state is distinct from 'idle'").fetchall()
            if not busy:
                break
            assert time.monotonic() < deadline, f"backends left busy by hostile clients: {busy}"
            time.sleep(0.05)
    assert server.process.poll() is None


# ---------------------------------------------------------------- a case and its outcome

@dataclasses.dataclass
class Case:
    """One connection: chunks sent in order (one write each), then how the client ends:
    'wait' reads until the server closes; 'shut' half-closes (FIN) and reads until the
    server closes; 'close' closes at once (FIN); 'rst' resets at once."""
    label: str
    chunks: list[bytes]
    finish: str = "wait"
    tls: bool = False
    gap: float = 0.0                    # seconds between chunks
    prefix: bytes = b""                 # single-byte answers expected first ('N' to a GSSENCRequest)
    direct: bool = False                # with tls: direct TLS (ALPN postgresql), no SSLRequest
    expect: str | None = None           # "session", "silent" (nothing said), or the one FATAL's message

    def describe(self) -> str:
        sent = " + ".join(_hex(c) for c in self.chunks) or "nothing"
        tls = ("direct TLS, " if self.direct else "TLS, ") if self.tls else ""
        return f"{self.label} [{tls}then {self.finish}]: {sent}"


@dataclasses.dataclass
class Outcome:
    received: bytes = b""
    end: str = ""          # 'closed' by the server, 'reset' by it, 'open' at the deadline, 'client' closed first
    seconds: float = 0.0


def _hex(data: bytes, limit: int = 48) -> str:
    shown = data[:limit].hex()
    return f"{shown}...({len(data)} bytes)" if len(data) > limit else shown or "''"


def reset(sock: socket.socket) -> None:
    """Close with a TCP RST."""
    if isinstance(sock, ssl.SSLSocket):
        sock = socket.socket(fileno=sock.detach())
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def parse_messages(data: bytes) -> tuple[list[tuple[int, bytes]], bytes, str | None]:
    """(messages, incomplete tail, problem) for a stream of backend messages."""
    out, i = [], 0
    while len(data) - i >= 5:
        (length,) = struct.unpack_from("!I", data, i + 1)
        if length < 4:
            return out, data[i:], f"message {chr(data[i])!r} with length {length}"
        if len(data) - i < 1 + length:
            break
        out.append((data[i], data[i + 5:i + 1 + length]))
        i += 1 + length
    return out, data[i:], None


def check_messages(data: bytes, end: str, *, session: bool) -> str | None:
    """What is wrong with what a client received, or None. Errors written by pgfast itself
    (PostgreSQL's carry its source file, F) must be FATALs in PostgreSQL's wording; nothing
    may follow a FATAL; the stream must be well formed."""
    msgs, tail, problem = parse_messages(data)
    if problem:
        return f"malformed reply: {problem}: {_hex(data, 80)}"
    if tail and end == "closed":
        return f"reply ends inside a message: {_hex(tail)}"
    for n, (msg_type, payload) in enumerate(msgs):
        if msg_type not in BACKEND_TYPES:
            return f"message of type {msg_type} is not a backend message: {_hex(data, 80)}"
        if msg_type != ord("E"):
            continue
        fields = error_fields(payload)
        if "F" not in fields:           # pgfast's own
            if fields.get("S") != "FATAL" or fields.get("V") != "FATAL":
                return f"pgfast sent a non-FATAL error: {fields}"
            if not any(p.fullmatch(fields.get("M", "")) for p in PGFAST_FATALS):
                return f"pgfast's FATAL is not PostgreSQL's wording: {fields.get('M')!r}"
        if fields.get("S") == "FATAL" and n != len(msgs) - 1:
            return f"messages after a FATAL: {msgs[n + 1:]}"
    if not session and end == "open":
        return "connection still open at the deadline"
    return None


# ---------------------------------------------------------------- running cases

def _read_until_closed(sock, start: float, deadline: float, on_data=None) -> Outcome:
    """Read until the server closes, resets, or deadline seconds after start. on_data(sock,
    received) may return a new (earlier) absolute time to give up at."""
    received = bytearray()
    give_up = start + deadline
    while True:
        left = give_up - time.monotonic()
        if left <= 0:
            return Outcome(bytes(received), "open", time.monotonic() - start)
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except (socket.timeout, TimeoutError):
            return Outcome(bytes(received), "open", time.monotonic() - start)
        except (ConnectionResetError, BrokenPipeError):
            return Outcome(bytes(received), "reset", time.monotonic() - start)
        except ssl.SSLError as exc:     # an alert or a bare close inside TLS
            return Outcome(bytes(received), f"tls: {exc.reason or exc}", time.monotonic() - start)
        if not chunk:
            return Outcome(bytes(received), "closed", time.monotonic() - start)
        received += chunk
        if on_data is not None:
            give_up = min(give_up, on_data(sock, bytes(received)) or give_up)


class _EndSessionOnReady:
    """When a mutated startup packet still starts a session, end it with Terminate at its
    first ReadyForQuery (and stop waiting a second later: what the mutation left in the
    stream may have swallowed the Terminate)."""

    def __init__(self, prefix: bytes):
        self.prefix = prefix
        self.started = False

    def __call__(self, sock, received: bytes) -> float | None:
        if self.started:
            return None
        msgs, _, _ = parse_messages(received[len(self.prefix):])
        if not any(t == ord("Z") for t, _ in msgs):
            return None
        self.started = True
        try:
            sock.sendall(TERMINATE)
        except OSError:
            pass
        return time.monotonic() + 1.0


def send_case(sock, case: Case) -> Outcome | None:
    """Send the case's chunks (case.gap apart) and end as it says when the client ends it
    (rst, close, shut: a half-close); None when the client goes on to read what comes."""
    try:
        for n, chunk in enumerate(case.chunks):
            if n and case.gap:
                time.sleep(case.gap)
            sock.sendall(chunk)
        if case.finish == "rst":
            reset(sock)
            return Outcome(end="client")
        if case.finish == "close":
            sock.close()
            return Outcome(end="client")
        if case.finish == "shut":
            assert not case.tls, "a half-close inside TLS is not a case (ssl.SSLSocket.shutdown drops TLS)"
            sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass                            # refused before all had been sent: read what was said
    return None


def run_case(port: int, case: Case, ctx: ssl.SSLContext | None = None, deadline: float = PREAUTH_DEADLINE) -> Outcome:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if case.tls:
        if not case.direct:
            sock.sendall(SSL_REQUEST)
            answer = sock.recv(1)
            assert answer == b"S", answer
        sock = ctx.wrap_socket(sock, server_hostname="localhost")
        if case.direct:
            assert sock.selected_alpn_protocol() == "postgresql"
    start = time.monotonic()
    ended = send_case(sock, case)
    if ended is not None:
        return ended
    watcher = _EndSessionOnReady(case.prefix)
    try:
        outcome = _read_until_closed(sock, start, deadline, watcher)
    finally:
        sock.close()
    if watcher.started and outcome.end == "open":
        outcome.end = "session"         # a session began, and the client left it
    return outcome


def judge(case: Case, outcome: Outcome) -> str | None:
    if outcome.end == "client":
        return None
    received = outcome.received
    if case.prefix:
        if not received.startswith(case.prefix):
            return f"expected {case.prefix!r} first, got {_hex(received)} ({outcome.end})"
        received = received[len(case.prefix):]
    problem = check_messages(received, outcome.end, session=False)
    if problem is None and outcome.end == "closed" and outcome.seconds > AUTH_TIMEOUT + 1.5:
        problem = f"closed only after {outcome.seconds:.1f} s"
    if problem is None and case.expect is not None:
        problem = _unexpected(case.expect, received, outcome)
    return problem


def _unexpected(expect: str, received: bytes, outcome: Outcome) -> str | None:
    msgs, tail, _ = parse_messages(received)
    if expect == "session":
        return None if any(t == ord("Z") for t, _ in msgs) else "expected a session (ReadyForQuery)"
    if expect == "silent":
        return None if not received else "expected the connection to end without a word"
    if outcome.end == "reset" and not received:
        return None                     # pgfast closed with unread input: the kernel sent RST, the answer was lost
    errors = [error_fields(p).get("M") for t, p in msgs if t == ord("E")]
    if errors != [expect] or tail or len(msgs) != 1:
        return f"expected exactly one FATAL {expect!r}, got {[chr(t) for t, _ in msgs]} {errors}"
    return None


def run_batch(cases: list[Case], run, judge_fn=judge) -> None:
    """Run every case (WORKERS at a time) and fail with the reproducers of those that went wrong."""
    def one(case: Case) -> str | None:
        try:
            outcome = run(case)
        except Exception as exc:      # the test's own side failed: say so, with the case
            return f"{case.describe()}\n    -> {type(exc).__name__}: {exc}"
        problem = judge_fn(case, outcome)
        if problem:
            return (f"{case.describe()}\n    -> {problem} (ended: {outcome.end} after {outcome.seconds:.2f} s, "
                    f"received {_hex(outcome.received, 80)})")
        return None

    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        problems = [p for p in pool.map(one, cases) if p]
    assert not problems, f"{len(problems)} of {len(cases)} cases went wrong:\n" + "\n".join(problems[:15])


def rng_for(name: str) -> random.Random:
    return random.Random(f"{SEED}-{name}")


# ---------------------------------------------------------------- generators

def random_garbage(rng: random.Random) -> bytes:
    data = bytearray(rng.randbytes(rng.choice([1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 64, 300, 5000, 20000, 70000])))
    if data[0] == 0x16:                 # a TLS handshake record would be direct TLS: its own batch
        data[0] = 0x17
    return bytes(data)


def random_packet(rng: random.Random) -> bytes:
    """A startup packet of a valid length with a random code and a random body."""
    body = rng.randbytes(rng.randrange(0, 300))
    code = rng.choice([rng.getrandbits(32), 196608, 196609, 2 << 16, 0, 1234 << 16 | rng.randrange(5679, 65536),
                       196608 | rng.randrange(2, 65536)])
    if code in (SSL_CODE, GSSENC_CODE, CANCEL_CODE):
        code = 196608
    if code >> 16 == 3 and rng.random() < 0.5:      # a layout PostgreSQL's parser walks
        body = b"".join(rng.choice([b"user", b"database", b"", b"options", b"x" * rng.randrange(5)]) + b"\0"
                        for _ in range(rng.randrange(6)))
    return struct.pack("!II", len(body) + 8, code) + body


def mutate_startup(rng: random.Random, packet: bytes = VALID_STARTUP) -> tuple[str, bytes]:
    """A mutation of a valid StartupMessage, and what it is."""
    data = bytearray(packet)
    kind = rng.choice(["flip", "set", "truncate", "duplicate", "no terminator", "extra terminator", "insert",
                       "delete", "length", "version", "duplicate parameter", "empty name", "no value"])

    def relength(b: bytearray) -> bytes:
        struct.pack_into("!I", b, 0, len(b))
        return bytes(b)

    if kind == "flip":
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return kind, bytes(data)
    if kind == "set":
        i = rng.randrange(len(data))
        data[i] = rng.randrange(256)
        return f"{kind} byte {i}", bytes(data)
    if kind == "truncate":
        return kind, bytes(data[:rng.randrange(len(data))])
    if kind == "duplicate":
        return kind, bytes(data) * rng.randint(2, 3)
    if kind == "no terminator":
        return kind, relength(data[:-1])
    if kind == "extra terminator":
        return kind, relength(data + b"\0" * rng.randint(1, 3))
    if kind == "insert":
        i = rng.randrange(8, len(data) + 1)
        data[i:i] = rng.randbytes(rng.randint(1, 8))
        return kind, relength(data) if rng.random() < 0.7 else bytes(data)
    if kind == "delete":
        i = rng.randrange(8, len(data))
        del data[i:i + rng.randint(1, 4)]
        return kind, relength(data) if rng.random() < 0.7 else bytes(data)
    if kind == "length":
        new = rng.choice([0, 4, 7, 8, 9, len(data) - 1, len(data) + 1, len(data) + 100, 10004, 10005, 0x7fffffff,
                          0x80000000, 0xffffffff, rng.getrandbits(32)])
        struct.pack_into("!I", data, 0, new)
        return f"length {new}", bytes(data)
    if kind == "version":
        struct.pack_into("!I", data, 4, rng.choice([0, 1 << 16, 2 << 16, 196609, 196608 | 0xffff, 4 << 16,
                                                    1234 << 16 | 5678, rng.getrandbits(32)]))
        return kind, bytes(data)
    if kind == "duplicate parameter":
        return kind, relength(data[:-1] + b"user\0postgres\0\0")
    if kind == "empty name":
        return kind, relength(data[:-1] + b"\0x\0\0")
    return kind, relength(data[:-1] + b"lonely\0")         # "no value"


# ---------------------------------------------------------------- 1. before TLS

def test_random_bytes_as_first_packet(server):
    rng = rng_for("random bytes")
    cases = [Case("random bytes", [random_garbage(rng)], rng.choice(["wait", "wait", "shut", "close", "rst"]))
             for _ in range(40)]
    cases += [Case("random packet", [random_packet(rng)], rng.choice(["wait", "shut", "rst"])) for _ in range(40)]
    cases += [Case("text", [t], "wait") for t in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\0" * 8, b"\xff" * 16,
                                                  b"SSH-2.0-OpenSSH_9.6\r\n", b"\r\n")]
    run_batch(cases, lambda c: run_case(server.port, c))
    assert_serving(server)


INVALID_LENGTHS = [0, 1, 2, 3, 4, 5, 6, 7, 10005, 10006, 65536, 0x7fffffff, 0x80000000, 0xffffffff,
                   0xfffffff8, 0xffffd8ec]      # the last two: -8 and -10004


def test_startup_packet_of_invalid_length(server):
    """Refused from the length word alone (whatever follows, or nothing), at once."""
    rng = rng_for("invalid lengths")
    cases = [Case(f"length {length}", [struct.pack("!I", length) + rng.randbytes(extra)], finish)
             for length in INVALID_LENGTHS for extra in (0, 4, 8, 200) for finish in ("wait", "shut")]
    expected = {"C": "08P01", "M": "invalid length of startup packet"}

    def judge_refused(case: Case, outcome: Outcome) -> str | None:
        msgs, tail, _ = parse_messages(outcome.received)
        if outcome.end not in ("closed", "reset") or outcome.seconds > 1.5:
            return "not refused at once"
        if outcome.end == "closed" and (len(msgs) != 1 or tail or msgs[0][0] != ord("E")):
            return "expected exactly one ErrorResponse"
        if msgs and {k: error_fields(msgs[0][1]).get(k) for k in expected} != expected:
            return f"expected {expected}"
        return None

    run_batch(cases, lambda c: run_case(server.port, c), judge_refused)
    assert_serving(server)


def test_startup_packets_of_edge_lengths_and_truncated(server):
    """8 (a code alone), 10004 (the longest PostgreSQL reads) and packets that never fully
    arrive (then silence, FIN or RST): layout errors, sessions, or a silent close at
    authentication_timeout."""
    head = startup_packet({"user": "postgres", "application_name": ""})
    longest = startup_packet({"user": "postgres", "application_name": "p" * (10004 - len(head))})
    assert len(longest) == 10004
    rng = rng_for("edge lengths")
    layout = "invalid startup packet layout: expected terminator as last byte"
    minor = rng.randrange(65536)
    cases = [
        Case("length 8, protocol 3.0, no body", [struct.pack("!II", 8, 196608)], expect=layout),
        Case("length 8, protocol 2.x", [struct.pack("!II", 8, 2 << 16 | minor)],
             expect=f"unsupported frontend protocol 2.{minor}: server supports 3.0 to 3.2"),
        Case("length 10004, a valid packet", [longest], expect="session"),
        Case("length 10004, a valid packet in 3 writes", [longest[:3], longest[3:5000], longest[5000:]], gap=0.05,
             expect="session"),
        Case("length 10004, random body", [struct.pack("!II", 10004, 196608) + rng.randbytes(9995) + b"\x01"],
             expect=layout),
        Case("length 10004, header only", [struct.pack("!II", 10004, 196608)], expect="silent"),
        Case("length 10004, header only, then FIN", [struct.pack("!II", 10004, 196608)], "shut", expect="silent"),
        Case("length 10004, one byte short", [longest[:-1]], expect="silent"),
        Case("length 10004, one byte short, then FIN", [longest[:-1]], "shut", expect="silent"),
        Case("length 10004, one byte short, then RST", [longest[:-1]], "rst"),
        Case("length word only", [struct.pack("!I", 100)], expect="silent"),
        Case("length word split", [b"\0", b"\0", b"\0"], gap=0.05, expect="silent"),
        Case("length word split, then FIN", [b"\0", b"\0"], "shut", gap=0.05, expect="silent"),
    ]
    for _ in range(36):                 # a valid StartupMessage cut short, then silence, FIN or RST
        cut = rng.randrange(0, len(VALID_STARTUP))
        cases.append(Case(f"first {cut} bytes", [VALID_STARTUP[:cut]] if cut else [],
                          rng.choice(["wait", "shut", "close", "rst"]), expect="silent"))
    run_batch(cases, lambda c: run_case(server.port, c))
    assert_serving(server)


def test_mutated_startup_packets(server):
    rng = rng_for("mutated startup")
    cases = []
    for _ in range(90):
        kind, packet = mutate_startup(rng)
        cases.append(Case(f"mutated ({kind})", [packet], rng.choice(["wait", "wait", "wait", "shut", "rst"])))
    run_batch(cases, lambda c: run_case(server.port, c))
    assert_serving(server)


def _tls_records(data: bytes) -> tuple[list[int], bytes]:
    """Content types of the whole TLS records in data, and what is left."""
    types, i = [], 0
    while len(data) - i >= 5:
        (length,) = struct.unpack_from("!H", data, i + 3)
        if len(data) - i < 5 + length:
            break
        types.append(data[i])
        i += 5 + length
    return types, data[i:]


def _judge_tls_only(case: Case, outcome: Outcome) -> str | None:
    """After 'S' (or on a direct TLS connection) only TLS records may come back (an alert,
    or a handshake when the mutation left the ClientHello valid), never plaintext."""
    received = outcome.received[len(case.prefix):]
    if not outcome.received.startswith(case.prefix):
        return f"expected {case.prefix!r} first"
    types, rest = _tls_records(received)
    if outcome.end == "open":
        return "connection still open at the deadline"
    if any(t not in (20, 21, 22, 23) for t in types) or (rest and outcome.end == "closed"):
        return f"something other than TLS records came back: records {types}, rest {_hex(rest)}"
    if 22 not in types and any(t != 21 for t in types):
        return f"records other than alerts without a handshake: {types}"
    return None


def _after_ssl_request(port: int, case: Case) -> Outcome:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sock.sendall(SSL_REQUEST)
        assert sock.recv(1) == b"S"
        start = time.monotonic()
        ended = send_case(sock, case)
        if ended is not None:
            return ended
        return _read_until_closed(sock, start, PREAUTH_DEADLINE)
    finally:
        sock.close()


def client_hello(ctx: ssl.SSLContext) -> bytes:
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def test_garbage_instead_of_a_client_hello(server, tls_context):
    """After 'S', or as a direct TLS handshake (a first byte 0x16): garbage, mutated and
    truncated ClientHellos get TLS records (an alert) or nothing back, never plaintext."""
    rng = rng_for("ssl garbage")
    hello = client_hello(tls_context)
    cases = [Case("random bytes", [random_garbage(rng)], rng.choice(["wait", "shut", "rst"])) for _ in range(16)]
    cases += [Case("a plaintext StartupMessage", [VALID_STARTUP]),
              Case("SSLRequest again", [SSL_REQUEST]),
              Case("HTTP", [b"GET / HTTP/1.1\r\n\r\n"]),
              Case("empty handshake record", [b"\x16\x03\x01\x00\x00"]),
              Case("handshake record of 0xffff", [b"\x16\x03\x01\xff\xff" + rng.randbytes(100)]),
              Case("alert record", [b"\x15\x03\x03\x00\x02\x02\x28"]),
              Case("application data record", [b"\x17\x03\x03\x00\x05hello"]),
              Case("SSLv2 hello", [b"\x80\x2e\x01\x03\x01" + rng.randbytes(0x2b)])]
    for _ in range(12):
        data = bytearray(hello)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        cases.append(Case("mutated ClientHello", [bytes(data)], rng.choice(["wait", "wait", "rst"])))
    for _ in range(6):
        cases.append(Case("truncated ClientHello", [hello[:rng.randrange(1, len(hello))]],
                          rng.choice(["wait", "shut", "rst"])))
    # direct TLS: no SSLRequest
    cases += [Case("0x16 then random bytes", [b"\x16" + rng.randbytes(rng.choice([1, 4, 10, 200, 3000]))],
                   rng.choice(["wait", "shut", "rst"]), direct=True) for _ in range(12)]
    for _ in range(8):
        data = bytearray(hello)
        data[rng.randrange(1, len(data))] = rng.randrange(256)
        cases.append(Case("mutated ClientHello, no SSLRequest", [bytes(data)], direct=True))
    cases.append(Case("truncated ClientHello, no SSLRequest", [hello[:rng.randrange(1, len(hello))]], direct=True))
    run_batch(cases, lambda c: run_case(server.port, c) if c.direct else _after_ssl_request(server.port, c),
              _judge_tls_only)
    assert_serving(server)


def test_ssl_request_with_plaintext_in_the_same_write(server):
    rng = rng_for("ssl request plus data")
    expected = {"C": "08P01", "M": "received unencrypted data after SSL request", "D": MITM_DETAIL}
    tails = [VALID_STARTUP, SSL_REQUEST, GSSENC_REQUEST, b"\x16\x03\x01\x00\x05hello", b"\0"]
    tails += [rng.randbytes(rng.randint(1, 1000)) for _ in range(11)]
    cases = [Case("SSLRequest + data", [SSL_REQUEST + tail], expect=expected["M"]) for tail in tails]

    def judge_refused(case: Case, outcome: Outcome) -> str | None:
        problem = judge(case, outcome)
        msgs, _, _ = parse_messages(outcome.received)
        if problem is None and msgs and {k: error_fields(msgs[0][1]).get(k) for k in expected} != expected:
            problem = f"expected {expected}, got {error_fields(msgs[0][1])} (instead of 'S')"
        return problem

    run_batch(cases, lambda c: run_case(server.port, c), judge_refused)
    assert_serving(server)


def test_gssenc_request_twice(server):
    refused = "unsupported frontend protocol 1234.5680: server supports 3.0 to 3.2"
    cases = [Case("GSSENCRequest twice in one write", [GSSENC_REQUEST * 2]),
             Case("GSSENCRequest twice in two writes", [GSSENC_REQUEST, GSSENC_REQUEST], gap=0.05),
             Case("GSSENCRequest twice, then a StartupMessage", [GSSENC_REQUEST * 2 + VALID_STARTUP]),
             Case("GSSENCRequest three times", [GSSENC_REQUEST * 3]),
             Case("GSSENCRequest twice, then FIN", [GSSENC_REQUEST * 2], "shut")]
    cases = [dataclasses.replace(c, prefix=b"N", expect=refused) for c in cases]
    run_batch(cases, lambda c: run_case(server.port, c))
    assert_serving(server)


def test_cancel_requests_of_the_wrong_length(server):
    """As PostgreSQL 18 (protocol 3.2: keys of 1 to 256 bytes): nothing is ever said back to
    a CancelRequest. Too short for a process ID, or a key of 0 or over 256 bytes, is logged
    ("invalid length of cancel request packet", "... of cancel key ...") and closed; any
    other length is a cancel whose random key matches nothing."""
    rng = rng_for("cancel")
    cases = [Case(f"CancelRequest of length {length}", [struct.pack("!II", length, CANCEL_CODE) + rng.randbytes(length - 8)],
                  expect="silent") for length in [8, 9, 12, 13, 15, 17, 20, 64, 268, 269, 10004]]
    cases += [Case("CancelRequest, random key", [struct.pack("!II", 16, CANCEL_CODE) + rng.randbytes(8)],
                   expect="silent") for _ in range(6)]
    cases.append(Case("CancelRequest, half, then FIN", [struct.pack("!II", 16, CANCEL_CODE)], "shut", expect="silent"))
    cases.append(Case("CancelRequest, then more", [struct.pack("!II", 16, CANCEL_CODE) + rng.randbytes(8) + VALID_STARTUP],
                      expect="silent"))
    mark = len(server.log)
    run_batch(cases, lambda c: run_case(server.port, c))
    assert_serving(server)
    log = server.log[mark:]
    assert "LOG:  invalid length of cancel request packet" in log, log
    assert "LOG:  invalid length of cancel key in cancel request packet" in log, log


# ---------------------------------------------------------------- RST at random points

class _Cut(Exception):
    pass


class MemoryTLS:
    """TLS over a raw socket through memory BIOs: every byte on the wire is the test's to
    send, hold back or corrupt."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext):
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")

    def handshake(self, point=lambda: None, rng: random.Random | None = None) -> None:
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                out = self.outgoing.read()
                if out and rng is not None and len(out) > 1:     # a chance to be cut inside a flight
                    split = rng.randrange(1, len(out))
                    self.sock.sendall(out[:split])
                    point()
                    out = out[split:]
                if out:
                    self.sock.sendall(out)
                point()
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("server closed during the handshake")
                self.incoming.write(data)
        out = self.outgoing.read()
        if out:
            self.sock.sendall(out)

    def encrypt(self, data: bytes) -> bytes:
        self.obj.write(data)
        return self.outgoing.read()

    def send(self, data: bytes) -> None:
        self.sock.sendall(self.encrypt(data))

    def decrypt(self, data: bytes) -> tuple[bytes, str | None]:
        """Plaintext in data, and how the TLS stream ended there (None: it did not)."""
        self.incoming.write(data)
        out = bytearray()
        while True:
            try:
                chunk = self.obj.read(65536)
            except ssl.SSLWantReadError:
                return bytes(out), None
            except ssl.SSLZeroReturnError:
                return bytes(out), "close_notify"
            except ssl.SSLError as exc:
                return bytes(out), f"{exc.reason or exc}"
            if not chunk:
                return bytes(out), "close_notify"
            out += chunk

    def recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("server closed")
        plain, ended = self.decrypt(data)
        if ended:
            raise ConnectionError(f"TLS ended: {ended}")
        return plain


class Wire:
    """A client connection, plain or TLS through memory BIOs, reading whole messages."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.tls: MemoryTLS | None = None
        self.buf = bytearray()

    def send(self, data: bytes) -> None:
        if self.tls is not None:
            self.tls.send(data)
        else:
            self.sock.sendall(data)

    def message(self) -> tuple[int, bytes]:
        while True:
            msgs, _, _ = parse_messages(bytes(self.buf))
            if msgs:
                msg_type, payload = msgs[0]
                del self.buf[:5 + len(payload)]
                return msg_type, payload
            data = self.tls.recv() if self.tls is not None else self.sock.recv(65536)
            if not data and self.tls is None:
                raise ConnectionError("server closed")
            self.buf += data


def scripted_client(port: int, ctx: ssl.SSLContext, flavour: str, cut: int, rng: random.Random) -> int:
    """A well-behaved client (flavour: plain|tls x trust|scram) reset with a TCP RST at its
    cut-th step; the number of steps it got through (all of them: it finished)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    steps = 0

    def point() -> None:
        nonlocal steps
        steps += 1
        if steps >= cut:
            raise _Cut

    wire = Wire(sock)
    try:
        point()
        if flavour.startswith("tls"):
            if rng.random() < 0.3:
                sock.sendall(SSL_REQUEST[:4])
                point()
                sock.sendall(SSL_REQUEST[4:])
            else:
                sock.sendall(SSL_REQUEST)
            point()
            assert sock.recv(1) == b"S"
            point()
            wire.tls = MemoryTLS(sock, ctx)
            wire.tls.handshake(point, rng)
            point()
        scram = flavour.endswith("scram")
        packet = startup_packet({"user": SCRAM_ROLE if scram else "postgres", "database": "postgres",
                                 "application_name": "rst"})
        split = rng.randrange(1, len(packet))
        wire.send(packet[:split])
        point()
        wire.send(packet[split:])
        point()
        client = None
        while True:
            msg_type, payload = wire.message()
            point()
            if msg_type == ord("E"):
                raise AssertionError(f"login failed: {error_fields(payload)}")
            if msg_type == ord("R"):
                (code,) = struct.unpack_from("!i", payload)
                if code == 10:
                    client = scramp.ScramClient(["SCRAM-SHA-256"], "*", SCRAM_PASSWORD)
                    first = client.get_client_first().encode()
                    wire.send(message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first))
                    point()
                elif code == 11:
                    client.set_server_first(payload[4:].decode())
                    wire.send(message(b"p", client.get_client_final().encode()))
                    point()
            if msg_type == ord("Z"):
                break
        query = query_message("select pg_sleep(0.01), 'rst'")
        split = rng.randrange(1, len(query))
        wire.send(query[:split])
        point()
        wire.send(query[split:])
        point()
        while wire.message()[0] != ord("Z"):
            point()
        wire.send(TERMINATE)
        sock.close()
        return steps
    except _Cut:
        reset(sock)
        return steps


def test_rst_at_random_points(server, tls_context):
    """Many clients vanish (RST) at random points: inside a packet, after 'S', inside the TLS
    handshake, during SCRAM, while the backend starts, inside a query, and in between."""
    rng = rng_for("rst")
    flavours = ["plain-trust", "plain-scram", "tls-trust", "tls-scram"]
    cases = [(rng.choice(flavours), rng.randint(1, 30), rng.getrandbits(32)) for _ in range(120)]

    def one(case):
        flavour, cut, seed = case
        try:
            scripted_client(server.port, tls_context, flavour, cut, random.Random(seed))
        except Exception as exc:
            return f"{flavour}, RST at step {cut} (seed {seed}): {type(exc).__name__}: {exc}"
        return None

    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        problems = [p for p in pool.map(one, cases) if p]
    assert not problems, "\n".join(problems)
    assert_serving(server)


# ---------------------------------------------------------------- during the SCRAM exchange

def _same_client_final(sent: bytes, good: bytes) -> bool:
    """Whether a mutated client-final-message says what the good one says (a changed base64
    padding bit, say): then, and only then, may it authenticate."""
    def attributes(data: bytes):
        return dict(part.split(b"=", 1) for part in data.split(b",") if b"=" in part)
    try:
        a, b = attributes(sent), attributes(good)
        return (a.keys() == b.keys() and all(a[k] == b[k] for k in a if k != b"p")
                and base64.b64decode(a[b"p"], validate=True) == base64.b64decode(b[b"p"], validate=True))
    except (ValueError, binascii.Error):
        return False


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        if out:
            out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


def scram_case(port: int, ctx: ssl.SSLContext | None, seed: int) -> str | None:
    """One SCRAM exchange with one message mutated, replaced, truncated or left out; what
    went wrong, or None. A mutated exchange must never authenticate."""
    rng = random.Random(seed)
    client = RawClient.connect(port, tls=ctx)
    sock = client.sock
    log = []
    try:
        client.startup(user=SCRAM_ROLE, database="postgres")
        msg_type, payload = client.read_message()
        assert msg_type == b"R" and struct.unpack_from("!i", payload)[0] == 10, (msg_type, payload)
        scram = scramp.ScramClient(["SCRAM-SHA-256"], "*", SCRAM_PASSWORD)
        first = scram.get_client_first().encode()
        stage = rng.choice(["mechanism", "length", "client-first", "client-first", "client-final", "client-final",
                            "type", "truncate"])
        mechanism, length, final_mutated = b"SCRAM-SHA-256", len(first), False
        if stage == "mechanism":
            mechanism = rng.choice([b"SCRAM-SHA-256-PLUS", b"", b"SCRAM-SHA-1", b"scram-sha-256", b"SCRAM-SHA-256\xff",
                                    rng.randbytes(12).replace(b"\0", b"x")])
        elif stage == "length":
            length = rng.choice([-2, -1, 0, len(first) - 1, len(first) + 1, 0x7fffffff, -0x80000000])
        elif stage == "client-first":
            first = rng.choice([_mutate_bytes(rng, first), _mutate_bytes(rng, first), b"n,,", b"y,,n=,r=", b"n,,n=,r=",
                                b"p=tls-server-end-point,,n=,r=a", b"p=tls-unique,,n=,r=a", b"n,a=x,n=,r=a",
                                b"n,,m=x,n=,r=a", b"x", b"n,,n=*,r=\x01abc", b"n,,n=*,r=abc,ext=1", b"y,,n=*,r=abc"])
            length = len(first)
        if stage == "type":
            bogus = rng.choice([b"Q", b"X", b"d", bytes([rng.randrange(256)])])
            body = rng.randbytes(rng.randint(0, 40))
            wire = bogus + struct.pack("!I", len(body) + 4) + body
            if rng.random() < 0.5:
                client.send(wire)
            else:   # as the client-final-message instead
                client.send(message(b"p", mechanism + b"\0" + struct.pack("!i", len(first)) + first))
                log.append(client.read_message())
                client.send(wire)
        elif stage == "truncate":
            initial = message(b"p", mechanism + b"\0" + struct.pack("!i", len(first)) + first)
            client.send(initial[:rng.randrange(1, len(initial))])
            if rng.random() < 0.5:
                reset(sock)
                return None
        else:
            body = mechanism + b"\0" + struct.pack("!i", length)
            if length != -1:
                body += first
            client.send(message(b"p", body))
            if stage == "client-final":
                msg_type, payload = client.read_message()
                log.append((msg_type, payload))
                if msg_type != b"R":
                    return f"no server-first-message: {msg_type} {error_fields(payload)}"
                scram.set_server_first(payload[4:].decode())
                good = scram.get_client_final().encode()
                final = rng.choice([_mutate_bytes(rng, good), _mutate_bytes(rng, good), b"c=biws", b"c=biws,r=x",
                                    b"", b"\0", b"c=eSws," + good.split(b",", 1)[1], good + b",x=1",
                                    good[:-1], b"c=biws,r=" + good.split(b"r=", 1)[1].split(b",")[0] + b",p=YQ=="])
                final_mutated = not _same_client_final(final, good)
                client.send(message(b"p", final))
        outcome = _read_until_closed(sock, time.monotonic(), PREAUTH_DEADLINE)
    finally:
        sock.close()
    msgs, _, _ = parse_messages(outcome.received)
    if any(t == ord("R") and struct.unpack_from("!i", p)[0] == 0 for t, p in msgs) and (
            stage != "client-final" or final_mutated):
        return f"AUTHENTICATED with a mutated exchange ({stage}): {msgs}"
    if outcome.end == "open":
        return f"{stage}: still open after {PREAUTH_DEADLINE} s (received {_hex(outcome.received)})"
    return check_messages(outcome.received, outcome.end, session=False)


def test_scram_exchange_mutations(server, tls_context):
    """Mutated SASLInitialResponse and SASLResponse messages, other message types in their
    place, truncated ones: refused in PostgreSQL's words (or dropped at
    authentication_timeout), never authenticated."""
    rng = rng_for("scram")
    plans = [(rng.random() < 0.4, rng.getrandbits(32)) for _ in range(60)]

    def one(plan):
        use_tls, seed = plan
        try:
            problem = scram_case(server.port, tls_context if use_tls else None, seed)
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
        return f"{'TLS' if use_tls else 'plain'}, seed {seed}: {problem}" if problem else None

    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        problems = [p for p in pool.map(one, plans) if p]
    assert not problems, "\n".join(problems)
    # and the right password still works
    client = RawClient.connect(server.port, tls=tls_context)
    client.startup(user=SCRAM_ROLE, database="postgres")
    client.authenticate(password=SCRAM_PASSWORD)
    assert client.query("select current_user") == [(SCRAM_ROLE,)]
    client.terminate()
    assert_serving(server)


# ---------------------------------------------------------------- 2. inside TLS, before startup

def test_tls_garbage_and_mutated_startup_packets(server, tls_context, direct_context):
    """Inside TLS negotiated with an SSLRequest, and inside direct TLS: random bytes, random
    packets, mutated StartupMessages, invalid lengths, garbage after a second SSLRequest."""
    rng = rng_for("tls random")
    cases = [Case("random bytes", [random_garbage(rng)], rng.choice(["wait", "wait", "close", "rst"]), tls=True,
                  direct=rng.random() < 0.3) for _ in range(30)]
    cases += [Case("random packet", [random_packet(rng)], rng.choice(["wait", "rst"]), tls=True,
                   direct=rng.random() < 0.3) for _ in range(20)]
    cases += [Case("SSLRequest inside direct TLS, then garbage", [SSL_REQUEST, random_garbage(rng)], gap=0.05,
                   prefix=b"N", tls=True, direct=True) for _ in range(10)]
    for _ in range(40):
        kind, packet = mutate_startup(rng)
        cases.append(Case(f"mutated ({kind})", [packet], rng.choice(["wait", "wait", "rst"]), tls=True,
                          direct=rng.random() < 0.2))
    cases += [Case(f"length {length}", [struct.pack("!I", length) + b"\0" * 4], tls=True,
                   expect="invalid length of startup packet") for length in (0, 3, 7, 10005, 0x7fffffff, 0xffffffff)]
    run_batch(cases, lambda c: run_case(server.port, c, direct_context if c.direct else tls_context))
    assert_serving(server)


def test_tls_second_ssl_request(server, tls_context, direct_context):
    """A second SSLRequest: inside TLS negotiated with an SSLRequest, PostgreSQL takes its
    code for a protocol version (FATAL 0A000, as 15 and 17 do); inside direct TLS, PostgreSQL
    17 answers 'N' and the session goes on."""
    client = RawClient.connect(server.port, tls=tls_context)
    client.send(SSL_REQUEST)
    outcome = _read_until_closed(client.sock, time.monotonic(), 5)
    client.close()
    assert _errors(parse_messages(outcome.received)[0]) == [
        ("0A000", "unsupported frontend protocol 1234.5679: server supports 3.0 to 3.2")], outcome
    for how in ("alone", "with the StartupMessage", "twice"):
        sock = direct_context.wrap_socket(socket.create_connection(("127.0.0.1", server.port), timeout=10),
                                          server_hostname="localhost")
        client = RawClient(sock)
        if how == "alone":
            client.send(SSL_REQUEST)
            assert client.sock.recv(1) == b"N"
            client.startup(user="postgres", database="postgres")
        elif how == "twice":
            client.send(SSL_REQUEST * 2)
            got = b""
            while len(got) < 2:
                got += client.sock.recv(2 - len(got))
            assert got == b"NN"
            client.startup(user="postgres", database="postgres")
        else:
            client.send(SSL_REQUEST + startup_packet({"user": "postgres", "database": "postgres"}))
            assert client.sock.recv(1) == b"N"
        client.authenticate()
        assert client.query("select 'inside'") == [("inside",)]
        client.terminate()
    assert_serving(server)          # (garbage after that 'N': test_tls_random_bytes_before_startup)


# ---------------------------------------------------------------- corrupted TLS records

def _memory_tls_client(port: int, ctx: ssl.SSLContext) -> MemoryTLS:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(SSL_REQUEST)
    assert sock.recv(1) == b"S"
    tls = MemoryTLS(sock, ctx)
    tls.handshake()
    return tls


def _log_in_over(tls: MemoryTLS) -> None:
    tls.send(VALID_STARTUP)
    wire = Wire(tls.sock)
    wire.tls = tls
    while True:
        msg_type, payload = wire.message()
        assert msg_type != ord("E"), error_fields(payload)
        if msg_type == ord("Z"):
            return


def corrupt_record(ca, port: int, version: ssl.TLSVersion, logged_in: bool, position: str,
                   rng: random.Random) -> str | None:
    """Send one TLS record with a byte changed on the wire; None when pgfast answered with
    a fatal alert and closed, else what happened."""
    tls = _memory_tls_client(port, client_context(ca, version))
    try:
        if logged_in:
            _log_in_over(tls)
        record = bytearray(tls.encrypt(query_message("select 'corrupt'") if logged_in else VALID_STARTUP))
        types, rest = _tls_records(bytes(record))
        assert types == [23] and not rest, (types, rest)
        index = {"type": 0, "version": 1, "first": 5, "last": len(record) - 1,
                 "payload": rng.randrange(5, len(record))}[position]
        record[index] ^= (1 << rng.randrange(8)) if position != "type" else 0x01    # 23 -> 22: handshake
        start = time.monotonic()
        tls.sock.sendall(bytes(record))
        outcome = _read_until_closed(tls.sock, start, 3)
        seconds = time.monotonic() - start
        if outcome.end == "open" or seconds > 1.5:
            return f"no prompt close ({outcome.end} after {seconds:.1f} s)"
        raw_types, _ = _tls_records(outcome.received)
        if version == ssl.TLSVersion.TLSv1_2 and 21 not in raw_types:
            return f"no alert record (content type 21) came back, only records {raw_types}"
        _, ended = tls.decrypt(outcome.received)
        if ended is None or "ALERT" not in ended.upper():
            return f"the connection ended without a fatal alert ({ended or 'bare close'}; records {raw_types})"
        return None
    finally:
        tls.sock.close()


def test_corrupted_tls_record_gets_an_alert(server, ca):
    """A byte flipped in a TLS record on the wire: pgfast answers with a fatal TLS alert
    (bad_record_mac, unexpected_message, protocol_version, ...) before it closes, both
    before the StartupMessage and in a session, in TLS 1.2 (content type 21 on the wire) and
    TLS 1.3 (the alert is encrypted: the client decrypts it)."""
    rng = rng_for("corrupt record")
    cases = [(version, logged_in, position, rng.getrandbits(32))
             for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3)
             for logged_in in (False, True)
             for position in ("type", "version", "first", "last", "payload", "payload")]

    def one(case):
        version, logged_in, position, seed = case
        try:
            problem = corrupt_record(ca, server.port, version, logged_in, position, random.Random(seed))
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
        return f"{version.name}, {'in a session' if logged_in else 'before startup'}, {position} byte " \
               f"(seed {seed}): {problem}" if problem else None

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        problems = [p for p in pool.map(one, cases) if p]
    assert not problems, "\n".join(problems)
    assert_serving(server)


def test_tls_records_cut_or_garbled_after_the_handshake(server, ca):
    """Not-quite-records after a completed handshake: a record cut short then RST or FIN, a
    record header with a huge length, random bytes. pgfast closes (with an alert or at
    authentication_timeout), never hangs or crashes."""
    rng = rng_for("garbled records")
    plans = [(rng.choice(["cut+rst", "cut+fin", "cut+wait", "huge length", "random", "plaintext"]),
              rng.choice([ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]), rng.getrandbits(32)) for _ in range(24)]

    def one(plan):
        how, version, seed = plan
        r = random.Random(seed)
        tls = _memory_tls_client(server.port, client_context(ca, version))
        try:
            record = tls.encrypt(VALID_STARTUP)
            start = time.monotonic()
            if how.startswith("cut"):
                tls.sock.sendall(record[:r.randrange(1, len(record))])
                if how == "cut+rst":
                    reset(tls.sock)
                    return None
                if how == "cut+fin":
                    tls.sock.shutdown(socket.SHUT_WR)
            elif how == "huge length":
                tls.sock.sendall(b"\x17\x03\x03\xff\xff" + r.randbytes(200))
            elif how == "random":
                tls.sock.sendall(r.randbytes(r.randint(1, 3000)))
            else:
                tls.sock.sendall(VALID_STARTUP)
            outcome = _read_until_closed(tls.sock, start, PREAUTH_DEADLINE)
            if outcome.end == "open":
                return f"{how}, {version.name} (seed {seed}): still open after {PREAUTH_DEADLINE} s"
            _, ended = tls.decrypt(outcome.received)
            if how == "huge length" and (ended is None or "ALERT" not in ended.upper()):
                return f"{how}, {version.name} (seed {seed}): ended with {ended or 'a bare close'}, no alert"
            return None
        finally:
            tls.sock.close()

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        problems = [p for p in pool.map(one, plans) if p]
    assert not problems, "\n".join(problems)
    assert_serving(server)


class OpenSSLClient:
    """A TLS 1.2 client made with pyOpenSSL on memory BIOs (Python's ssl cannot renegotiate)."""

    def __init__(self, port: int):
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.sendall(SSL_REQUEST)
        assert self.sock.recv(1) == b"S"
        self.conn = SSL.Connection(ctx, None)
        self.conn.set_connect_state()
        self.plain = b""

    def run(self, step, timeout: float = 3) -> tuple[str, float]:
        """Call step until it stops wanting to read: ('done' or why not, seconds)."""
        start = time.monotonic()
        while True:
            try:
                step()
                return "done", time.monotonic() - start
            except SSL.WantReadError:
                pass
            except SSL.Error as exc:
                return f"refused: {exc}", time.monotonic() - start
            try:
                self.sock.sendall(self.conn.bio_read(65536))
            except SSL.WantReadError:
                pass
            left = start + timeout - time.monotonic()
            if left <= 0:
                return "no answer", time.monotonic() - start
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except (socket.timeout, TimeoutError):
                return "no answer", time.monotonic() - start
            except OSError:
                data = b""
            if not data:
                return "closed", time.monotonic() - start
            self.conn.bio_write(data)

    def log_in(self) -> None:
        assert self.run(self.conn.do_handshake)[0] == "done"
        self.conn.sendall(VALID_STARTUP)

        def ready() -> None:
            self.plain += self.conn.recv(65536)
            if not self.plain.endswith(b"Z\0\0\0\x05I"):
                raise SSL.WantReadError()
        assert self.run(ready)[0] == "done"

    def renegotiate(self, timeout: float = 3) -> tuple[str, float]:
        assert self.conn.renegotiate()

        def renegotiated() -> None:
            self.conn.do_handshake()
            if self.conn.renegotiate_pending():
                raise SSL.WantReadError()
        return self.run(renegotiated, timeout)


def test_tls12_renegotiation_is_refused(server):
    """Client-initiated TLS 1.2 renegotiations (a CPU cost a client could repeat at will)
    are refused, before the StartupMessage and in a session, and the server goes on. (That
    the refusal comes only at authentication_timeout, or never in an idle session, is a
    defect: see test_tls12_renegotiation_is_refused_at_once.)"""
    def one(in_session: bool) -> str | None:
        client = OpenSSLClient(server.port)
        try:
            if in_session:
                client.log_in()
            else:
                assert client.run(client.conn.do_handshake)[0] == "done"
            outcome, _ = client.renegotiate(timeout=0.5)
            if outcome == "done":
                return f"renegotiated ({'in a session' if in_session else 'before startup'})"
            return None
        finally:
            reset(client.sock)

    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        problems = [p for p in pool.map(one, [False, True] * 12) if p]
    assert not problems, problems
    assert_serving(server)


# ---------------------------------------------------------------- 3. in a session

@dataclasses.dataclass(frozen=True)
class Way:
    """How the hostile sessions are had: plaintext or TLS, and as which role, so in which
    pool mode (TX_ROLE has pgfast.pool_mode = transaction through ALTER ROLE SET)."""
    tls: bool
    role: str

    @property
    def name(self) -> str:
        return f"{'tls' if self.tls else 'plain'}-{'transaction' if self.role == TX_ROLE else 'session'}"


# transaction pooling over TLS only (its relay is the same without TLS; the time is better spent)
WAYS = [Way(False, "postgres"), Way(True, "postgres"), Way(True, TX_ROLE)]
@pytest.fixture(params=WAYS, ids=[w.name for w in WAYS])
def way(request) -> Way:
    return request.param


@pytest.fixture
def target(way, request) -> Pgfast:
    """The server for this way: transaction pooling has a server of its own."""
    return request.getfixturevalue("tx_server" if way.role == TX_ROLE else "server")


def logged_in(server: Pgfast, ctx: ssl.SSLContext | None, role: str = "postgres") -> RawClient:
    client = RawClient.connect(server.port, tls=ctx)
    client.startup(user=role, database="postgres", application_name="hostile-session")
    client.authenticate()
    return client


def session_case(server: Pgfast, ctx: ssl.SSLContext | None, case: Case, role: str = "postgres",
                 deadline: float = SESSION_DEADLINE) -> Outcome:
    """Log in, then send the case's chunks and end as it says ('wait': read until pgfast
    closes; 'linger': read for a moment, then end with Terminate)."""
    client = logged_in(server, ctx, role)
    sock = client.sock
    start = time.monotonic()
    ended = send_case(sock, case)
    if ended is not None:
        return ended
    try:
        if case.finish == "linger":
            outcome = _read_until_closed(sock, start, 0.4)
            if outcome.end == "open":
                try:
                    sock.sendall(TERMINATE)
                except OSError:
                    pass
            return outcome
        return _read_until_closed(sock, start, deadline)
    finally:
        sock.close()


def assert_pooled_sessions_clean(server: Pgfast, ctx: ssl.SSLContext | None, role: str = "postgres") -> None:
    """Sessions with the hostile sessions' startup packet get pooled backends: each must be
    as new (idle, no transaction, statement, portal, temp table or LISTEN left over; under
    transaction pooling pgfast keeps prepared statements of its own on its backends)."""
    statements = ("(select count(*) from pg_prepared_statements)" if role != TX_ROLE else "0")
    clients = [logged_in(server, ctx, role) for _ in range(4)]
    try:
        for client in clients:
            client.send(query_message(
                f"select {statements}, (select count(*) from pg_cursors), "
                "(select count(*) from pg_class where relnamespace = pg_my_temp_schema()), "
                "(select count(*) from pg_listening_channels()), current_setting('application_name')"))
            msgs = client.read_until_ready()
            assert msgs[-1] == (b"Z", b"I"), msgs
            rows = [p for t, p in msgs if t == b"D"]
            assert len(rows) == 1 and [t for t, _ in msgs if t == b"E"] == [], msgs
            assert rows[0].endswith(b"hostile-session"), rows
            assert rows[0].count(b"\x00\x00\x00\x010") == 4, rows      # four counts of '0'
    finally:
        for client in clients:
            client.terminate()


def judge_session(case: Case, outcome: Outcome) -> str | None:
    if outcome.end == "client":
        return None
    problem = check_messages(outcome.received, outcome.end, session=True)
    if problem is None and case.finish == "wait" and outcome.end == "open":
        problem = f"the session was not closed within {SESSION_DEADLINE} s"
    return problem


def test_session_messages_of_invalid_length(target, tls_context, way):
    """Lengths 0-3 (pgfast's own framing refuses them) and 0x7fffffff (PostgreSQL refuses
    it): the session ends, promptly, and its backend is not kept."""
    rng = rng_for(f"session lengths {way.name}")
    cases = []
    for length in (0, 1, 2, 3, 0x7fffffff, 0x40000000, 0xffffffff):
        for msg_type in (b"Q", b"P", b"S", b"d", bytes([rng.randrange(256)])):
            if msg_type == b"X":
                continue
            body = rng.randbytes(rng.choice([0, 3, 50]))
            lead = rng.choice([b"", query_message("select 1")])
            cases.append(Case(f"{msg_type!r} of length {length}", [lead + msg_type + struct.pack("!I", length) + body],
                              rng.choice(["wait", "wait", "rst"])))
    run_batch(cases, lambda c: session_case(target, tls_context if way.tls else None, c, way.role), judge_session)
    assert_serving(target)
    assert_pooled_sessions_clean(target, tls_context if way.tls else None, way.role)


def test_session_unknown_message_types(target, tls_context, way):
    rng = rng_for(f"session types {way.name}")
    cases = []
    for msg_type in rng.sample(UNKNOWN_TYPES, 20):
        payload = rng.randbytes(rng.choice([0, 1, 10, 1000]))
        cases.append(Case(f"type {msg_type}", [bytes([msg_type]) + struct.pack("!I", len(payload) + 4) + payload]))

    def judge_unknown(case: Case, outcome: Outcome) -> str | None:
        problem = judge_session(case, outcome)
        if problem:
            return problem
        msgs, _, _ = parse_messages(outcome.received)
        msg_type = case.chunks[0][0]
        if outcome.end == "closed" and [error_fields(p).get("M") for _, p in msgs] != [
                f"invalid frontend message type {msg_type}"]:
            return f"expected PostgreSQL's FATAL invalid frontend message type {msg_type}"
        return None

    run_batch(cases, lambda c: session_case(target, tls_context if way.tls else None, c, way.role), judge_unknown)
    assert_serving(target)
    assert_pooled_sessions_clean(target, tls_context if way.tls else None, way.role)


def _valid_messages(rng: random.Random) -> list[bytes]:
    return [query_message("select 1"), query_message("begin; select 2"), parse("s", "select $1::int"),
            parse("", "select pg_sleep(0.01)"), bind(), execute(), SYNC, FLUSH,
            message(b"D", b"S" + b"s\0"), message(b"C", b"P\0"), message(b"d", rng.randbytes(20)),
            query_message("select repeat('x', 100000)"), message(b"F", rng.randbytes(12))]


def _unsynced_execution(stream: bytes) -> bool:
    """Whether the whole messages in a client's stream end with an Execute or a Flush that
    no Sync follows: a backend left running the extended protocol, which transaction
    pooling hands on instead of closing (test_transaction_pooling_never_commits_an_unsynced_insert)."""
    pending, i = False, 0
    while len(stream) - i >= 5:
        (length,) = struct.unpack_from("!I", stream, i + 1)
        if length < 4 or len(stream) - i < 1 + length:
            break
        if stream[i] in b"EH":
            pending = True
        elif stream[i] == ord("S"):
            pending = False
        i += 1 + length
    return pending


def _known_tx_defect(way: Way, case: Case) -> bool:
    return way.role == TX_ROLE and _unsynced_execution(b"".join(case.chunks))


def test_session_truncated_messages_then_close(target, tls_context, way):
    rng = rng_for(f"session truncated {way.name}")
    cases = []
    for _ in range(20):
        msgs = _valid_messages(rng)
        head = b"".join(rng.sample(msgs, rng.randint(0, 3)))
        last = rng.choice(msgs)
        cut = rng.randrange(1, len(last))
        cases.append(Case(f"{len(head)} bytes of messages, then {cut} of {len(last)}", [head + last[:cut]],
                          rng.choice(["close", "rst"])))
    cases = [c for c in cases if not _known_tx_defect(way, c)]     # (its own reproducer: see there)
    run_batch(cases, lambda c: session_case(target, tls_context if way.tls else None, c, way.role), judge_session)
    assert_serving(target)
    assert_pooled_sessions_clean(target, tls_context if way.tls else None, way.role)


def test_terminate_in_the_middle_of_copy_from_stdin(target, tls_context, way):
    """Terminate (or a vanished client) in the middle of COPY FROM STDIN: the session ends,
    nothing is committed, the backend is closed, not handed on. An 'X' inside CopyData is
    data, not a Terminate."""
    ctx = tls_context if way.tls else None
    copy = query_message("copy hostile_copy from stdin")
    rows = message(b"d", b"a\nb\n") + message(b"d", b"Xylophone\n") + message(b"d", b"Xy\n")     # 4 rows
    for how in ("Terminate", "Terminate inside a CopyData", "RST", "FIN", "Terminate after CopyDone without Sync"):
        client = logged_in(target, ctx, way.role)
        client.send(copy)
        assert client.read_message()[0] == b"G"         # CopyInResponse
        if how == "Terminate":
            client.send(rows + TERMINATE)
        elif how == "Terminate inside a CopyData":      # 'X' as data, then the client vanishes
            client.send(rows + message(b"d", b"zzzzzzzz\n")[:7] + TERMINATE)
            client.reset()
            continue
        elif how == "RST":
            client.send(rows)
            client.reset()
            continue
        elif how == "FIN":
            client.send(rows)
            client.close()
            continue
        else:
            client.send(rows + message(b"c") + TERMINATE)
        assert client.closed_by_server(SESSION_DEADLINE), how
        client.close()
    assert_serving(target)
    with normal_connect(target) as conn:
        # every COPY above was abandoned (nothing committed) except the one ended with
        # CopyDone before the Terminate: its 4 rows are committed, as PostgreSQL would
        assert conn.execute("select count(*) from hostile_copy").fetchone()[0] == 4
        conn.execute("truncate hostile_copy")
    # an 'X' inside CopyData does not end the session
    client = logged_in(target, ctx, way.role)
    client.send(copy)
    assert client.read_message()[0] == b"G"
    client.send(message(b"d", b"X\n") + message(b"d", b"Xenon\n") + message(b"c"))
    assert [m for m, _ in client.read_until_ready()][-2:] == [b"C", b"Z"]
    assert client.query("select count(*) from hostile_copy") == [("2",)]
    client.query("truncate hostile_copy")
    client.terminate()
    assert_serving(target)
    assert_pooled_sessions_clean(target, ctx, way.role)


def test_parse_without_sync_then_rst(target, tls_context, way):
    rng = rng_for(f"parse rst {way.name}")
    cases = []
    for _ in range(12):
        stream = parse(rng.choice(["", "p1"]), rng.choice(["select 1", "select $1", "begin", "select pg_sleep(0.05)"]))
        if rng.random() < 0.5:
            stream += bind(statement="") + execute()
        if rng.random() < 0.5:
            stream += FLUSH
        cases.append(Case("Parse without Sync", [stream], rng.choice(["rst", "close"])))
    cases.append(Case("open transaction, then RST", [query_message("begin; select 1")], "rst"))
    cases.append(Case("open transaction, then RST after the answer",      # (the empty chunk: a pause)
                      [query_message("begin; create temp table t(a int)"), b""], "rst", gap=0.1))
    cases = [c for c in cases if not _known_tx_defect(way, c)]     # (its own reproducer: see there)
    run_batch(cases, lambda c: session_case(target, tls_context if way.tls else None, c, way.role), judge_session)
    assert_serving(target)
    assert_pooled_sessions_clean(target, tls_context if way.tls else None, way.role)


def random_stream(rng: random.Random) -> bytes:
    parts = []
    for _ in range(rng.randint(1, 12)):
        roll = rng.random()
        if roll < 0.5:
            parts.append(rng.choice(_valid_messages(rng)))
        elif roll < 0.7:
            msg_type = rng.choice(b"BCDEFHPQSdcf")
            payload = rng.randbytes(rng.choice([0, 1, 4, 30, 300]))
            parts.append(bytes([msg_type]) + struct.pack("!I", len(payload) + 4) + payload)
        elif roll < 0.8:        # a length that does not match what follows
            payload = rng.randbytes(rng.randint(0, 40))
            parts.append(bytes([rng.choice(b"QPBEDS")]) + struct.pack("!I", rng.randint(4, 200)) + payload)
        elif roll < 0.9:
            parts.append(rng.randbytes(rng.randint(1, 50)))
        else:
            parts.append(query_message(rng.choice(["select 'ok'", "rollback", "commit", "copy hostile_copy from stdin",
                                                   "copy (select 1) to stdout", "select 1/0", "listen x",
                                                   "select pg_sleep(0.02)", "\0"])))
    return b"".join(parts)


def test_random_message_streams(target, tls_context, way):
    rng = rng_for(f"session random {way.name}")
    cases = []
    for n in range(40):
        stream = random_stream(rng)
        pieces = [stream]
        if rng.random() < 0.3 and len(stream) > 2:
            split = rng.randrange(1, len(stream))
            pieces = [stream[:split], stream[split:]]
        cases.append(Case(f"random stream {n}", pieces, rng.choice(["linger", "linger", "rst", "close"]), gap=0.01))
    run_batch(cases, lambda c: session_case(target, tls_context if way.tls else None, c, way.role), judge_session)
    with normal_connect(target) as conn:
        conn.execute("truncate hostile_copy")
    assert_serving(target)
    assert_pooled_sessions_clean(target, tls_context if way.tls else None, way.role)


# ---------------------------------------------------------------- at the end

def _pending_scram_session(server: Pgfast) -> tuple[socket.socket, bytes, bytes]:
    """A connection left waiting in the SCRAM exchange: it holds a session slot, no backend."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(startup_packet({"user": SCRAM_ROLE, "database": "postgres"}))
    client = RawClient(sock)
    msg_type, payload = client.read_message()
    return sock, msg_type, payload


def test_zy_every_session_slot_was_given_back(server):
    """After all the batches, max_connections clients can still be past their startup packet
    at once, and the next one is refused: no hostile client's slot was kept (a slot leaks if
    a way out forgets to count the session as gone)."""
    assert_serving(server)
    limit = MAX_CONNECTIONS
    for attempt in range(2):
        held, refused = [], []
        try:
            for _ in range(limit):
                sock, msg_type, payload = _pending_scram_session(server)
                held.append(sock)
                if msg_type != b"R":
                    refused.append(error_fields(payload).get("M"))
            if not refused:
                sock, msg_type, payload = _pending_scram_session(server)
                held.append(sock)
                assert (msg_type, error_fields(payload).get("M")) == (b"E", "sorry, too many clients already")
                break
        finally:
            for sock in held:
                reset(sock)
        time.sleep(AUTH_TIMEOUT + 0.5)      # a slot held by a client still in its timeout goes then
    else:
        raise AssertionError(f"only {limit - len(refused)} of max_connections = {limit} sessions could start: "
                             f"{refused[:3]}")
    assert_serving(server)


LOG_LINE = re.compile(r"^\S+ \S+ \S+ \[(\d+)\] (?:\S+ )?([A-Z]+):  (.*)$")     # (?:client)
BAD_SIGNS = ("Traceback", "Task was destroyed", "Exception in callback", "exception was never retrieved",
             "Fatal error on", "Unhandled error", "Fatal write error", "pgfast: unexpected",
             "pgfast dropped a backend connection", "RuntimeError", "Error on reading from")


def assert_log_clean(server: Pgfast) -> None:
    assert_serving(server)
    time.sleep(0.5)                     # let the log writer and the reader catch up
    log = server.log
    bad = [line for line in log.splitlines() if any(sign in line for sign in BAD_SIGNS)]
    assert not bad, "pgfast's log shows internal errors:\n" + "\n".join(bad[:30])
    pids = {str(pid) for pid in server.pgfast_pids | pgfast_pids(server)}
    fatals = sorted({m.group(3) for m in map(LOG_LINE.match, log.splitlines())
                     if m and m.group(1) in pids and m.group(2) == "FATAL"})
    foreign = [f for f in fatals if not any(p.fullmatch(f) for p in PGFAST_FATALS)]
    assert not foreign, f"FATALs pgfast wrote that are not PostgreSQL's wording: {foreign[:20]}\nall: {fatals[:40]}"


def test_zz_log_is_clean_and_fatals_are_postgresql_s(server):
    assert_log_clean(server)


def test_zz_transaction_pooling_log_is_clean(tx_server):
    assert_log_clean(tx_server)


# ---------------------------------------------------------------- defects found: reproducers
#
# Each asserts what PostgreSQL 15 does with the same bytes (checked against a stock
# PostgreSQL 15 with ssl = on and the same pg_hba.conf), and fails on pgfast today.

def _exchange(server: Pgfast, data: bytes, half_close: bool = False, deadline: float = 5) -> list[tuple[int, bytes]]:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        outcome = _read_until_closed(sock, time.monotonic(), deadline)
    finally:
        sock.close()
    return parse_messages(outcome.received)[0]


def _errors(msgs: list[tuple[int, bytes]]) -> list[tuple[str | None, str | None]]:
    return [(error_fields(p).get("C"), error_fields(p).get("M")) for t, p in msgs if t == ord("E")]


@pytest.mark.parametrize("when", ["before login", "in a session"])
def test_half_closed_client_still_gets_its_answers(defect_server, when):
    if when == "before login":
        msgs = _exchange(defect_server, VALID_STARTUP + query_message("select 42") + TERMINATE, half_close=True)
    else:
        client = logged_in(defect_server, None)
        client.send(query_message("select pg_sleep(0.1), 42"))
        client.sock.shutdown(socket.SHUT_WR)
        client.sock.settimeout(5)
        received = b""
        while chunk := client.sock.recv(65536):
            received += chunk
        client.close()
        msgs = parse_messages(received)[0]
    rows = [p for t, p in msgs if t == ord("D")]
    assert rows and rows[0].endswith(b"\x00\x00\x00\x0242"), msgs


def test_query_pipelined_behind_the_startup_message(defect_server):
    query = query_message("select length('" + "x" * 300000 + "')")
    msgs = _exchange(defect_server, VALID_STARTUP + query + TERMINATE)
    assert _errors(msgs) == [], _errors(msgs)
    assert any(t == ord("D") and p.endswith(b"300000") for t, p in msgs), msgs


@pytest.mark.parametrize("msg_type,length,expected", [
    (b"p", 0x7fffffff, ("28P01", f'password authentication failed for user "{SCRAM_ROLE}"')),
    (b"p", 2, ("28P01", f'password authentication failed for user "{SCRAM_ROLE}"')),
    (b"p", 70000, ("28P01", f'password authentication failed for user "{SCRAM_ROLE}"')),
    (b"\x01", 2, ("08P01", "expected SASL response, got message type 1")),
], ids=["p-0x7fffffff", "p-2", "p-70000", "type1-2"])
def test_sasl_message_of_invalid_length(defect_server, msg_type, length, expected):
    packet = startup_packet({"user": SCRAM_ROLE, "database": "postgres"})
    msgs = _exchange(defect_server, packet + msg_type + struct.pack("!I", length))
    assert msgs and msgs[0][0] == ord("R") and struct.unpack_from("!i", msgs[0][1])[0] == 10, msgs
    assert _errors(msgs) == [expected]


def test_gssenc_request_inside_tls(defect_server, tls_context):
    client = RawClient.connect(defect_server.port, tls=tls_context)
    client.send(GSSENC_REQUEST)
    outcome = _read_until_closed(client.sock, time.monotonic(), 1)
    client.close()
    assert _errors(parse_messages(outcome.received)[0]) == [
        ("0A000", "unsupported frontend protocol 1234.5680: server supports 3.0 to 3.2")], outcome


def test_non_utf8_user_name_under_password_authentication(defect_server):
    body = b"user\0hostile\xff\0database\0" + SCRAM_DATABASE.encode() + b"\0\0"
    packet = struct.pack("!II", len(body) + 8, 196608) + body
    msgs = _exchange(defect_server, packet)
    assert msgs and msgs[0][0] == ord("R") and struct.unpack_from("!i", msgs[0][1])[0] == 10, (msgs, _errors(msgs))


def _scram_reply(server: Pgfast, first: bytes | None, final=None) -> tuple[bytes, dict | int]:
    """Send a client-first-message (and a client-final-message made from the good one);
    the server's answer to the last one: ('E', fields C/M/D) or ('R', request code)."""
    client = RawClient.connect(server.port)
    try:
        client.startup(user=SCRAM_ROLE, database="postgres")
        assert client.read_message()[0] == b"R"
        scram = scramp.ScramClient(["SCRAM-SHA-256"], "*", SCRAM_PASSWORD)
        first = first if first is not None else scram.get_client_first().encode()
        client.send(message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first))
        msg_type, payload = client.read_message()
        if msg_type == b"R" and final is not None:
            scram.set_server_first(payload[4:].decode())
            client.send(message(b"p", final(scram.get_client_final().encode())))
            msg_type, payload = client.read_message()
        if msg_type == b"E":
            return msg_type, {k: v for k, v in error_fields(payload).items() if k in "CMD"}
        return msg_type, struct.unpack_from("!i", payload)[0]
    finally:
        client.close()


@pytest.mark.parametrize("first,final,expected", [
    (b"n,,n=*,r=\xb8abcdefghijklmnopqrstuvwx", None,
     (b"E", {"C": "08P01", "M": "non-printable characters in SCRAM nonce"})),
    (b"n,,n=*,r=\x01abcdefghijklmnopqrstuvwx", None,
     (b"E", {"C": "08P01", "M": "non-printable characters in SCRAM nonce"})),
    (None, lambda good: b"c=bi\x9ds," + good.split(b",", 1)[1],
     (b"E", {"C": "08P01", "M": "unexpected SCRAM channel-binding attribute in client-final-message"})),
    (None, lambda good: good[:-3] + b"\xe8==",
     (b"E", {"C": "08P01", "M": "malformed SCRAM message", "D": "Malformed proof in client-final-message."})),
    (b"n,,n=,r=", None, (b"R", 11)),
], ids=["nonce-0xb8", "nonce-0x01", "channel-binding-0x9d", "proof-0xe8", "empty-nonce"])
def test_malformed_scram_messages_get_postgresql_s_words(defect_server, first, final, expected):
    """Found answered with Python's and scramp's words ("'utf-8' codec can't decode byte 0xb8
    in position 9", "Attribute values must at least one character long: other-error") under
    'malformed SCRAM message', and an empty nonce refused; fixed by c13c7a2 (SCRAM done as
    PostgreSQL does it). PostgreSQL 15's answers to the same bytes."""
    assert _scram_reply(defect_server, first, final) == expected


def test_catalog_failure_after_the_client_left(defect_server):
    # hold the catalog session's queue: its next lookup waits for a lock on a catalog it reads
    with normal_connect(defect_server) as locker:
        locker.autocommit = False
        locker.execute("lock table pg_catalog.pg_db_role_setting in access exclusive mode")
        waiting = socket.create_connection(("127.0.0.1", defect_server.port), timeout=5)
        waiting.sendall(startup_packet({"user": "postgres", "database": "hostile_fresh_name"}))
        time.sleep(0.2)
        body = b"user\0hostile\xfe\0database\0postgres\0\0"          # queued behind it, fails once run
        hostile = socket.create_connection(("127.0.0.1", defect_server.port), timeout=5)
        hostile.sendall(struct.pack("!II", len(body) + 8, 196608) + body)
        time.sleep(0.2)
        reset(hostile)                                              # the client goes first
        time.sleep(0.2)
        locker.rollback()
    reset(waiting)
    time.sleep(0.5)
    assert defect_server.process.poll() is None
    assert "exception was never retrieved" not in defect_server.log, defect_server.log[-3000:]


@pytest.mark.parametrize("in_session", [False, True], ids=["before startup", "in a session"])
def test_tls12_renegotiation_is_refused_at_once(defect_server, in_session):
    client = OpenSSLClient(defect_server.port)
    try:
        if in_session:
            client.log_in()
        else:
            assert client.run(client.conn.do_handshake)[0] == "done"
        outcome, seconds = client.renegotiate(timeout=1.5)
    finally:
        reset(client.sock)
    assert outcome.startswith("refused") and "no renegotiation" in outcome and seconds < 1, (outcome, seconds)


def test_transaction_pooling_closes_after_a_fatal(defect_server):
    client = logged_in(defect_server, None, TX_ROLE)
    client.send(b"\x01" + struct.pack("!I", 5) + b"5")
    outcome = _read_until_closed(client.sock, time.monotonic(), 1)
    client.close()
    assert _errors(parse_messages(outcome.received)[0]) == [("08P01", "invalid frontend message type 1")]
    assert outcome.end == "closed", outcome


def test_transaction_pooling_duplicate_prepared_statement_is_an_error(defect_server):
    client = logged_in(defect_server, None, TX_ROLE)
    try:
        client.send(parse("s", "select 1") + SYNC + parse("s", "select 2") + SYNC)
        msgs = client.read_until_ready() + client.read_until_ready()
        errors = [error_fields(p) for t, p in msgs if t == b"E"]
        assert [(e.get("S"), e.get("C")) for e in errors] == [("ERROR", "42P05")], errors
        assert client.query("select 'still here'") == [("still here",)]
    finally:
        client.close()


def test_transaction_pooling_copy_done_then_terminate(defect_server):
    with normal_connect(defect_server) as conn:
        conn.execute("truncate hostile_copy")
    client = logged_in(defect_server, None, TX_ROLE)
    client.send(query_message("copy hostile_copy from stdin"))
    assert client.read_message()[0] == b"G"
    client.send(message(b"d", b"a\nb\n") + message(b"c") + TERMINATE)
    assert client.closed_by_server(5)
    client.close()
    time.sleep(0.3)
    with normal_connect(defect_server) as conn:
        assert conn.execute("select count(*) from hostile_copy").fetchone()[0] == 2


def test_transaction_pooling_never_commits_an_unsynced_insert(defect_server):
    with normal_connect(defect_server) as conn:
        conn.execute("truncate hostile_copy")
    client = logged_in(defect_server, None, TX_ROLE)
    client.send(parse("", "insert into hostile_copy values ('never committed')") + bind() + execute() + FLUSH)
    assert [client.read_message()[0] for _ in range(3)] == [b"1", b"2", b"C"]    # executed, not committed
    client.reset()
    time.sleep(0.3)
    for _ in range(10):                 # other clients of the same pool
        other = logged_in(defect_server, None, TX_ROLE)
        other.query("select 1")
        other.terminate()
    time.sleep(0.3)
    with normal_connect(defect_server) as conn:
        assert conn.execute("select count(*) from hostile_copy").fetchone()[0] == 0
