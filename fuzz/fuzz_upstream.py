"""Upstream mode: what pgfast reads from its configuration about the upstream, and what an
upstream server sends it while it logs in.

Input: data[0] % 4 picks the sub-target, the rest is read by a _harness.Reader
(byte = one byte, chunk = u16 length + bytes, rest = all that is left):

0 conninfo.parse(rest as text): an Upstream whose hosts each have a name and a port in
  1..65535, or ConninfoError; describe() and repr() never show a password= value (one
  that appears once in the text, alphanumeric)
1 conninfo.read_passfile on rest as a file, then password_for(chunk-chosen host, port,
  database, user): a str or None; a line of five "*" fields matches anything (given a
  database and a user: libpq looks nothing up without them)
2 scram.ScramClient (password or ScramKeys, picked): first(), then final(chunk as the
  server-first-message), then verify(rest as the server-final-message): only
  ConnectionError; a correct server (this file's own SCRAM server) is accepted
3 credentials.Login(user, a picked Secret).answer(code, chunk) for AuthenticationRequests
  until the input ends: bytes (a well-formed 'p' message) or None, or ConnectionError

Allowed: ConninfoError (0, 1), ConnectionError (2, 3), nothing else.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import struct
import tempfile

import _harness
from _harness import Reader, fail

with _harness.instrumented():
    from pgfast import conninfo, credentials, scram
    from pgfast.conninfo import ConninfoError
    from pgfast.scram import ScramClient, ScramKeys

PASSWORD = b"upstream-secret"
SALT = bytes(range(16))
ITERATIONS = 4096
_PASSFILE = os.path.join(tempfile.mkdtemp(prefix="fuzz-upstream-"), "pgpass")


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _keys() -> ScramKeys:
    salted = hashlib.pbkdf2_hmac("sha256", PASSWORD, SALT, ITERATIONS)
    return ScramKeys(_hmac(salted, b"Client Key"), _hmac(salted, b"Server Key"), SALT, ITERATIONS)


KEYS = _keys()


def t_parse(r: Reader) -> None:
    text = r.rest().decode("utf-8", "replace")
    try:
        upstream = conninfo.parse(text, base_dir="/nonexistent")
    except ConninfoError as exc:
        if not str(exc):
            fail("parse.empty-message", repr(text))
        return
    if not upstream.hosts:
        fail("parse.no-host", repr(text))
    for host in upstream.hosts:
        if not host.host or not 0 < host.port < 65536:
            fail("parse.bad-host", f"{text!r}: {host!r}")
    shown = upstream.describe() + repr(upstream)
    if re.search(r"=\s", text):
        return      # libpq reads "host= password=x" as host "password=x": words are not pairs then
    for word in text.split():
        key, eq, value = word.partition("=")
        if key == "password" and eq and len(value) >= 6 and value.isalnum() and text.count(value) == 1 \
                and value in shown:
            fail("parse.password-shown", repr(text))


def t_passfile(r: Reader) -> None:
    host = r.chunk().decode("utf-8", "replace") or "localhost"
    port = r.u16() or 5432
    database = r.chunk().decode("utf-8", "replace")
    user = r.chunk().decode("utf-8", "replace")
    wildcard = r.byte() & 1
    content = r.rest()
    if wildcard:
        content = b"*:*:*:*:found\n" + content
    with open(_PASSFILE, "wb") as f:
        f.write(content)
    try:
        entries = conninfo.read_passfile(_PASSFILE)
    except ConninfoError:
        return
    except UnicodeDecodeError:
        return          # not text: libpq's fgets would read bytes; pgfast reads the file as UTF-8
    found = conninfo.password_for(entries, host, port, database, user)
    if found is not None and not isinstance(found, str):
        fail("passfile.type", repr(found))
    if wildcard and database and user and found != "found":     # libpq looks nothing up without both
        fail("passfile.wildcard-missed", f"{content!r} -> {found!r}")


def _server_first(client_first: bytes, nonce_suffix: bytes) -> tuple[bytes, bytes]:
    bare = client_first[3:]
    client_nonce = bare.split(b"r=", 1)[1]
    server_first = (b"r=" + client_nonce + nonce_suffix + b",s=" + base64.b64encode(SALT)
                    + b",i=" + str(ITERATIONS).encode())
    return bare, server_first


def t_scram_client(r: Reader) -> None:
    client = ScramClient(PASSWORD) if r.byte() & 1 else ScramClient(keys=KEYS)
    correct = r.byte() & 1
    first = client.first()
    if not first.startswith(b"n,,n=,r="):
        fail("scram.first", repr(first))
    if correct:
        bare, server_first = _server_first(first, base64.b64encode(r.take(12)) or b"x")
    else:
        bare, server_first = b"", r.chunk()
    try:
        final = client.final(server_first)
    except ConnectionError:
        if correct:
            fail("scram.correct-server-first-refused", repr(server_first))
        return
    without_proof, _, proof = final.rpartition(b",p=")
    if correct:
        auth_message = bare + b"," + server_first + b"," + without_proof
        stored_key = hashlib.sha256(KEYS.client_key).digest()
        client_key = bytes(a ^ b for a, b in zip(base64.b64decode(proof), _hmac(stored_key, auth_message)))
        if hashlib.sha256(client_key).digest() != stored_key:
            fail("scram.wrong-proof", repr(final))
        server_final = b"v=" + base64.b64encode(_hmac(KEYS.server_key, auth_message))
        mutation = r.rest()
        if mutation:
            server_final = mutation
        try:
            client.verify(server_final)
        except ConnectionError:
            if not mutation:
                fail("scram.correct-signature-refused", repr(server_final))
        return
    try:
        client.verify(r.rest())
    except ConnectionError:
        pass


SECRETS = (credentials.Secret(), credentials.Secret(password=PASSWORD), credentials.Secret(scram=KEYS),
           credentials.Secret(md5="md5" + hashlib.md5(PASSWORD + b"alice").hexdigest()),
           credentials.Secret(md5="not an md5 hash"))


def t_login(r: Reader) -> None:
    login = credentials.Login("alice", r.pick(SECRETS))
    while r.remaining():
        code = r.pick((3, 5, 10, 11, 12, 7, 9, 0, r.byte()))
        data = r.chunk()
        try:
            answer = login.answer(code, data)
        except ConnectionError:
            return
        if answer is None:
            continue
        if answer[:1] != b"p" or struct.unpack("!I", answer[1:5])[0] != len(answer) - 1:
            fail("login.malformed-answer", repr(answer))


SUBTARGETS = (t_parse, t_passfile, t_scram_client, t_login)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    SUBTARGETS[data[0] % len(SUBTARGETS)](Reader(data[1:]))


if __name__ == "__main__":
    _harness.main(test_one_input)
