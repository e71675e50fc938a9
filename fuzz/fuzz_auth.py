"""Authentication: the message parsers in pgfast/auth.py, pgfast.passwords, and the real
async exchange pgfast.auth.authenticate_password over a fake in-memory Exchange.

Input: data[0] % 7 picks the sub-target, the rest is read by a _harness.Reader
(byte = one byte, chunk = u16 length + bytes, rest = all that is left):

0 _initial_mechanism(rest)                1 _initial_data(rest)
2 _check_scram_input(rest)                3 ScramServer.first(rest) alone (pick mechanism,
                                             channel binding, TLS or not)
4 ScramServer(pick mechanism, pick secret, pick channel binding): .first(chunk),
  then .final(): a chunk, or (byte & 1) a correct client-final computed from the
  server-first by this file's own SCRAM client, then mutated by a chunk
5 passwords: byte % 3 = 0 parse_scram(rest); 1 check_plain_password(chunk, chunk, rest)
  (secret and user decoded as catalog.py decodes, UTF-8 with surrogateescape; the password
  as bytes, as a client sends it);
  2 a secret built from a chunk password the way PostgreSQL builds one (pick iteration
  count, pick salt length): check_plain_password must accept that password
6 authenticate_password(line, info, exchange, credentials, channel_binding,
  password_encryption): picks for the method, the credentials, channel binding, the
  password_encryption and the user, then the client's messages until the input ends:
  a type byte and a chunk payload; type 0xF0 is "answer the last request correctly"
  (cleartext password, md5 response for the salt sent, SASLInitialResponse, SCRAM
  client-final for the server-first sent) with the chunk as a mutation (empty: none).

Allowed: AuthFailed (a Refused) only, from the parsers, ScramServer and the exchange. Also checked:
a mock secret never accepts; a role that cannot log in never succeeds; a correct
exchange with a valid role succeeds; every request sent is a well-formed 'R' message;
every refusal can be written as an ErrorResponse.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import struct

import _harness
from _harness import Reader, fail

with _harness.instrumented():
    import scramp
    from scramp.utils import saslprep
    from pgfast import auth, messages, passwords, scram
    from pgfast.auth import AuthFailed, ClientInfo
    from pgfast.catalog import Credentials
    from pgfast.hba import HbaLine, Token
    from pgfast.scram import SCRAM, SCRAM_PLUS, ScramServer, mock_scram

PASSWORD = "secret"
USERS = ("alice", "postgres", "a" * 70)
CB_DATA = hashlib.sha256(b"a server certificate").digest()
SALT = bytes(range(16))


# --- an independent SCRAM implementation (RFC 5802 / PostgreSQL's scram-common.c) -----------

def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def pg_prepare(password: str) -> bytes:
    """PostgreSQL's pg_saslprep use in scram_SaltedPassword: pure ASCII as is; otherwise
    SASLprep (scramp's tables stand in for PostgreSQL's), and the raw bytes when that fails."""
    raw = password.encode("utf-8", "surrogateescape")
    if raw.isascii():
        return raw
    try:
        return saslprep(raw.decode("utf-8")).encode("utf-8")
    except (UnicodeDecodeError, scramp.ScramException):
        return raw


def _gs2_header_length(client_first: str) -> int:
    """Length of "n,," / "y,," / "p=type,," (flag, authzid, then the bare message); 0 if malformed."""
    first = client_first.find(",")
    second = client_first.find(",", first + 1) if first >= 0 else -1
    return second + 1 if second >= 0 else 0


def pg_scram_secret(password: str, iterations: int, salt: bytes) -> str:
    """What PostgreSQL's scram_build_secret stores."""
    salted = hashlib.pbkdf2_hmac("sha256", pg_prepare(password), salt, iterations)
    stored = hashlib.sha256(_hmac(salted, b"Client Key")).digest()
    server = _hmac(salted, b"Server Key")
    b64 = lambda b: base64.b64encode(b).decode()
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored)}:{b64(server)}"


def client_final(password: str, client_first_bare: str, server_first: str, gs2_header: str,
                 cb_data: bytes | None) -> str:
    attrs = dict(part.split("=", 1) for part in server_first.split(",") if "=" in part)
    salted = hashlib.pbkdf2_hmac("sha256", pg_prepare(password), base64.b64decode(attrs["s"]), int(attrs["i"]))
    client_key = _hmac(salted, b"Client Key")
    stored = hashlib.sha256(client_key).digest()
    cbind = gs2_header.encode() + ((cb_data or b"") if gs2_header.startswith("p=") else b"")
    without_proof = f"c={base64.b64encode(cbind).decode()},r={attrs['r']}"
    auth_message = f"{client_first_bare},{server_first},{without_proof}".encode()
    proof = bytes(a ^ b for a, b in zip(client_key, _hmac(stored, auth_message)))
    return f"{without_proof},p={base64.b64encode(proof).decode()}"


def mutate(data: bytes, how: bytes) -> bytes:
    """An auto-generated message, changed as the fuzzer says (nothing for b"")."""
    if not how:
        return data
    op, arg = how[0] % 5, how[1:]
    if op == 0:
        return data + arg
    if op == 1:
        return data[:len(arg) % (len(data) + 1)]
    if op == 2:
        pos = (arg[0] if arg else 0) % (len(data) + 1)
        return data[:pos] + arg[1:] + data[pos + len(arg[1:]):]
    if op == 3:
        pos = (arg[0] if arg else 0) % (len(data) + 1)
        return data[:pos] + arg[1:] + data[pos:]
    return arg + data


REAL_SECRET = pg_scram_secret(PASSWORD, 4096, SALT)
LOW_ITER_SECRET = pg_scram_secret(PASSWORD, 1000, SALT)
SHORT_SALT_SECRET = pg_scram_secret(PASSWORD, 4096, SALT[:8])


def md5_secret(user: str) -> str:
    return "md5" + hashlib.md5((PASSWORD + user).encode("utf-8", "surrogateescape")).hexdigest()


def wire_text(raw: bytes) -> str:
    """Text as pgfast gets it from the wire or the catalogs: no NUL, UTF-8 with surrogateescape."""
    return raw.replace(b"\0", b"").decode("utf-8", "surrogateescape")


# --- sub-targets -------------------------------------------------------------------------------

def t_initial_mechanism(r: Reader) -> None:
    payload = r.rest()
    try:
        mechanism, rest = auth._initial_mechanism(payload)
    except AuthFailed as exc:
        if b"\0" in payload:
            fail("initial_mechanism.refused-with-nul", repr(exc))
        return
    end = payload.index(b"\0")
    if mechanism != payload[:end].decode("utf-8", "replace") or rest != payload[end + 1:]:
        fail("initial_mechanism.split", repr((mechanism, rest)))


def t_initial_data(r: Reader) -> None:
    rest = r.rest()
    try:
        data = auth._initial_data(rest)
    except AuthFailed:
        if len(rest) >= 4:
            (n,) = struct.unpack("!i", rest[:4])
            if (n == -1 and len(rest) == 4) or (n >= 0 and len(rest) == 4 + n):
                fail("initial_data.refused-valid", repr(rest[:16]))
        return
    if data is None:
        if rest != b"\xff\xff\xff\xff":
            fail("initial_data.none", repr(rest[:16]))
    elif struct.unpack("!i", rest[:4])[0] != len(data) or rest[4:] != data:
        fail("initial_data.data", repr(rest[:16]))


def t_check_scram_input(r: Reader) -> None:
    data = r.rest()
    try:
        auth._check_scram_input(data)
    except AuthFailed:
        if data and b"\0" not in data:
            fail("check_scram_input.refused-valid", repr(data[:32]))
        return
    if not data or b"\0" in data:
        fail("check_scram_input.accepted-invalid", repr(data[:32]))


def t_channel_binding_flag(r: Reader) -> None:
    mechanism = r.pick((SCRAM, SCRAM_PLUS))
    offered = bool(r.byte() & 1)
    client_first = r.rest()
    server = ScramServer(mechanism, scram.parse_scram(REAL_SECRET), CB_DATA if offered else None, offered)
    try:
        server.first(client_first)
    except AuthFailed as exc:
        check_refusal(exc)
        return
    flag = client_first[:1]
    if flag not in (b"n", b"y", b"p") or (flag == b"p") != (mechanism == SCRAM_PLUS):
        fail("channel_binding_flag.accepted", repr((mechanism, client_first[:40], offered)))


def t_scram_server(r: Reader) -> None:
    mechanism = r.pick((SCRAM, SCRAM_PLUS))
    cb = r.pick((None, CB_DATA))
    mock = bool(r.byte() & 1)
    user = r.pick(USERS)
    secret = mock_scram(user) if mock else scram.parse_scram(REAL_SECRET)
    first = r.chunk()
    auto = bool(r.byte() & 1)
    server = ScramServer(mechanism, secret, cb, cb is not None)
    try:
        server_first = server.first(first).decode()
    except AuthFailed as exc:
        check_refusal(exc)
        return
    first_text = first.decode("utf-8", "replace")
    if auto:
        header_end = _gs2_header_length(first_text)
        final = mutate(client_final(PASSWORD, first_text[header_end:], server_first, first_text[:header_end],
                                    cb).encode(), r.chunk())
    else:
        final = r.chunk()
    try:
        server_final = server.final(final)
    except AuthFailed as exc:
        check_refusal(exc)
        return
    if server_final is not None and mock:
        fail("scram.mock-secret-accepted", repr((first, final)))
    if server_final is not None and not server_final.startswith(b"v="):
        fail("scram.server-final", repr(server_final))


def t_passwords(r: Reader) -> None:
    mode = r.byte() % 3
    if mode == 0:
        text = wire_text(r.rest())
        secret = scram.parse_scram(text)
        if secret is not None and not (isinstance(secret.iterations, int) and isinstance(secret.salt, bytes)):
            fail("parse_scram.types", repr(secret))
        return
    if mode == 1:       # none of these can hold a NUL: C strings in PostgreSQL, refused by auth.py
        secret = wire_text(r.chunk())
        password = r.chunk()
        user = wire_text(r.rest())
        parsed = scram.parse_scram(secret)
        if parsed is not None and parsed.iterations > 20000:
            return          # slow on purpose (PBKDF2), not interesting here
        result = passwords.check_plain_password(secret, password, user)
        if not isinstance(result, bool):
            fail("check_plain_password.type", repr(result))
        return
    iterations = r.pick((4096, 1, 2, 100, 1000, 4095, 5000))
    salt = bytes(range(r.pick((16, 12, 32, 11, 8, 1))))
    password = wire_text(r.rest())
    if not password:
        return      # auth.py refuses an empty password before any check
    secret = pg_scram_secret(password, iterations, salt)
    if not passwords.check_plain_password(secret, password.encode("utf-8", "surrogateescape"), "alice"):
        raw = password.encode("utf-8", "surrogateescape")
        if iterations < 4096:
            why = "iterations-below-4096"
        elif len(salt) < 12:
            why = "salt-shorter-than-12"
        elif raw.isascii():
            why = "ascii-control-character" if any(b < 32 or b == 127 for b in raw) else "ascii"
        elif pg_prepare(password) == raw:
            why = "not-utf8" if raw != password.encode("utf-8", "replace") else "saslprep-refused"
        else:
            why = "other"
        fail(f"check_plain_password.rejects-right-password.{why}",
             f"a PostgreSQL secret (iterations {iterations}, {len(salt)}-byte salt) for password {password!r}")
    if passwords.check_plain_password(secret, (password + "x").encode("utf-8", "surrogateescape"), "alice"):
        fail("check_plain_password.accepts-wrong-password", repr(password))


# --- the exchange ----------------------------------------------------------------------------

class Exhausted(Exception):
    """The fake client has nothing more to say (the connection would time out or close)."""


class FakeExchange:
    def __init__(self, reader: Reader, user: str, channel_binding: bytes | None):
        self.reader = reader
        self.user = user
        self.channel_binding = channel_binding
        self.sent: list[tuple[int, bytes]] = []     # (auth request code, data)
        self.all_auto = True                        # every message was a correct, unmutated answer
        self.messages = 0
        self.client_first_bare = None
        self.gs2_header = None

    def send(self, data: bytes) -> None:
        if len(data) < 9 or data[:1] != b"R" or int.from_bytes(data[1:5], "big") != len(data) - 1:
            fail("exchange.malformed-request", repr(data[:32]))
        code = int.from_bytes(data[5:9], "big")
        if code not in (3, 5, 10, 11, 12):
            fail("exchange.unknown-request", str(code))
        self.sent.append((code, data[9:]))

    def _auto(self) -> tuple[int, bytes]:
        code, data = self.sent[-1] if self.sent else (0, b"")
        if code == 3:
            return ord("p"), PASSWORD.encode() + b"\0"
        if code == 5:
            inner = hashlib.md5((PASSWORD + self.user).encode("utf-8", "surrogateescape")).hexdigest()
            return ord("p"), b"md5" + hashlib.md5(inner.encode() + data).hexdigest().encode() + b"\0"
        if code == 10:
            offered = [m.decode() for m in data.split(b"\0") if m]
            plus = SCRAM_PLUS in offered and self.channel_binding is not None
            self.gs2_header = "p=tls-server-end-point,," if plus else "n,,"
            self.client_first_bare = "n=,r=fuzzclientnonce"
            first = (self.gs2_header + self.client_first_bare).encode()
            mech = (SCRAM_PLUS if plus else SCRAM).encode()
            return ord("p"), mech + b"\0" + struct.pack("!i", len(first)) + first
        if code == 11 and not data:         # the server asks for the initial response
            self.gs2_header, self.client_first_bare = "n,,", "n=,r=fuzzclientnonce"
            return ord("p"), (self.gs2_header + self.client_first_bare).encode()
        if code == 11 and self.client_first_bare is not None:
            final = client_final(PASSWORD, self.client_first_bare, data.decode(), self.gs2_header,
                                 self.channel_binding)
            return ord("p"), final.encode()
        return ord("p"), b"\0"

    async def receive(self) -> tuple[int, bytes]:
        r = self.reader
        if r.remaining() == 0:
            raise Exhausted()
        self.messages += 1
        msg_type = r.byte()
        payload = r.chunk()
        if msg_type == 0xF0:
            msg_type, auto = self._auto()
            if payload:
                self.all_auto = False
            return msg_type, mutate(auto, payload)
        self.all_auto = False
        return msg_type, payload


CRED_KINDS = ("scram", "md5", "plain", "none-role", "no-secret", "expired", "no-login", "scram-low-iterations",
              "scram-short-salt", "fuzz-secret")


def _run(coro):
    """Drive a coroutine that never really waits (the fake exchange answers at once)."""
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()
    fail("exchange.awaited", "authenticate_password waited on something other than the exchange")


def check_refusal(exc) -> None:
    code = exc.sqlstate
    if not (isinstance(code, str) and len(code) == 5 and all(c.isdigit() or "A" <= c <= "Z" for c in code)):
        fail("refusal.sqlstate", repr(code))
    messages.error(exc.sqlstate, exc.message, detail=exc.detail)
    for text in (exc.message, exc.detail, exc.log_detail):
        if text is not None and not isinstance(text, str):
            fail("refusal.text", repr(text))


def t_exchange(r: Reader) -> None:
    method = r.pick(("scram-sha-256", "md5", "password"))
    kind = r.pick(CRED_KINDS)
    channel_binding = r.pick((None, CB_DATA))
    password_encryption = r.pick(("scram-sha-256", "md5"))
    user = r.pick(USERS + ("fuzz",))
    if user == "fuzz":
        user = wire_text(r.chunk()) or "alice"
    secret = {"scram": REAL_SECRET, "md5": md5_secret(user), "plain": PASSWORD, "expired": REAL_SECRET,
              "no-login": REAL_SECRET, "scram-low-iterations": LOW_ITER_SECRET,
              "scram-short-salt": SHORT_SALT_SECRET}.get(kind)
    if kind == "fuzz-secret":
        secret = wire_text(r.chunk())
        parsed = scram.parse_scram(secret)
        if parsed is not None and parsed.iterations > 20000:
            return
    credentials = None if kind == "none-role" else Credentials(secret, kind != "no-login", kind == "expired")
    line = HbaLine(file="/fuzz/pg_hba.conf", line_no=1, text=f"host all all 0.0.0.0/0 {method}",
                   conntype="host", databases=(Token("all", False),), users=(Token("all", False),),
                   ip_cmp="all", ip=None, hostname=None, method=method, clientcert=None, map=None)
    info = ClientInfo(local=False, ssl=channel_binding is not None, address="192.0.2.1", user=user,
                      database="db", replication=False, certificate_cn=None)
    exchange = FakeExchange(r, user, channel_binding)
    try:
        _run(auth.authenticate_password(line, info, exchange, credentials, channel_binding, password_encryption))
        outcome, refusal = "ok", None
    except AuthFailed as exc:
        check_refusal(exc)
        outcome, refusal = "refused", exc
    except Exhausted:
        return
    usable = kind in ("scram", "md5", "plain", "scram-low-iterations", "scram-short-salt")
    if outcome == "ok" and not (usable or kind == "fuzz-secret"):
        fail("exchange.accepted-unusable-role", f"{kind} role accepted by {method}")
    # a correct client and a role that can log in: PostgreSQL lets it in
    expected_ok = usable and exchange.all_auto and (
        method == "password"
        or (method == "md5" and kind in ("md5", "scram", "scram-low-iterations", "scram-short-salt"))
        or (method == "scram-sha-256" and kind in ("scram", "scram-low-iterations", "scram-short-salt")))
    if expected_ok and outcome != "ok":
        path = {3: "password-method", 5: "md5-exchange", 10: "scram-exchange"}.get(exchange.sent[0][0], "?")
        fail(f"exchange.correct-client-refused.{path}.{kind}",
             f"method {method}, user {user!r}, channel binding {channel_binding is not None}: refused after "
             f"{exchange.messages} correct messages with {refusal.sqlstate} {refusal.message!r} "
             f"(detail {refusal.detail!r}, log detail {refusal.log_detail!r})")


SUBTARGETS = (t_initial_mechanism, t_initial_data, t_check_scram_input, t_channel_binding_flag, t_scram_server,
              t_passwords, t_exchange)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    SUBTARGETS[data[0] % len(SUBTARGETS)](Reader(data[1:]))


if __name__ == "__main__":
    _harness.main(test_one_input)
