"""The client side of the upstream login (pgfast/credentials.py) against pgfast's own
SCRAM server (pgfast/scram.py, which follows PostgreSQL's auth-scram.c): pass-through
from a ClientKey, channel binding, and the rules that keep a server from skipping steps."""
from __future__ import annotations

import base64
import hashlib
import hmac
import struct

import pytest

from pgfast.credentials import Login, Policy, Secret
from pgfast.scram import SCRAM, SCRAM_PLUS, ScramKeys, ScramSecret, ScramServer, keys_for

PASSWORD = b"upstream-secret"
SALT = bytes(range(16))
ITERATIONS = 4096
CB_DATA = hashlib.sha256(b"the upstream's certificate").digest()
STORED, SERVER_KEY = keys_for(PASSWORD, SALT, ITERATIONS)
SECRET = ScramSecret(ITERATIONS, SALT, STORED, SERVER_KEY)


def _client_key() -> bytes:
    salted = hashlib.pbkdf2_hmac("sha256", PASSWORD, SALT, ITERATIONS)
    return hmac.new(salted, b"Client Key", hashlib.sha256).digest()


def _sasl_payload(message: bytes) -> tuple[bytes, bytes]:
    """(mechanism, client-first) of a SASLInitialResponse 'p' message."""
    body = message[5:]
    mechanism, rest = body.split(b"\0", 1)
    (length,) = struct.unpack("!i", rest[:4])
    return mechanism, rest[4:4 + length]


def _exchange(secret: Secret, policy: Policy, offered: list[str], channel_binding: bytes | None):
    """A whole SCRAM login; returns the mechanism the client chose."""
    login = Login("alice", secret, policy)
    first = login.answer(10, b"".join(m.encode() + b"\0" for m in offered) + b"\0", channel_binding)
    mechanism, client_first = _sasl_payload(first)
    server = ScramServer(mechanism.decode(), SECRET, channel_binding, ssl_in_use=channel_binding is not None)
    final = login.answer(11, server.first(client_first), channel_binding)
    server_final = server.final(final[5:])
    assert server_final is not None, "the server refused the client's proof"
    assert server.client_key == _client_key()
    assert login.answer(12, server_final, channel_binding) is None
    assert login.answer(0, b"", channel_binding) is None
    return mechanism.decode()


@pytest.mark.parametrize("secret", [Secret(password=PASSWORD),
                                    Secret(scram=ScramKeys(_client_key(), SERVER_KEY, SALT, ITERATIONS))],
                         ids=["password", "pass-through"])
def test_scram_with_and_without_channel_binding(secret):
    assert _exchange(secret, Policy(), [SCRAM_PLUS, SCRAM], CB_DATA) == SCRAM_PLUS
    assert _exchange(secret, Policy(channel_binding="disable"), [SCRAM_PLUS, SCRAM], CB_DATA) == SCRAM
    assert _exchange(secret, Policy(), [SCRAM], None) == SCRAM


def test_a_server_that_offers_no_plus_over_tls_is_told_the_client_could_bind():
    """gs2 flag 'y' (RFC 5802): PostgreSQL refuses it when it does support binding, so a
    man in the middle that strips SCRAM-SHA-256-PLUS from the offer is caught."""
    login = Login("alice", Secret(password=PASSWORD))
    _, client_first = _sasl_payload(login.answer(10, SCRAM.encode() + b"\0\0", CB_DATA))
    assert client_first.startswith(b"y,,")
    with pytest.raises(Exception, match="channel binding negotiation error"):
        ScramServer(SCRAM, SECRET, CB_DATA, ssl_in_use=True).first(client_first)


@pytest.mark.parametrize("steps, message", [
    ([(12, b"v=" + base64.b64encode(b"x" * 32))], "AuthenticationSASLFinal received from server, but SASL "
                                                  "authentication was not completed"),
    ([(0, b"")], "server sent AuthenticationOk before the SCRAM exchange was complete"),
    ([(3, b"")], "server asked for another authentication in the middle of a SASL exchange"),
    ([(10, SCRAM.encode() + b"\0\0")], "duplicate SASL authentication request"),
])
def test_a_server_cannot_skip_or_switch_steps(steps, message):
    login = Login("alice", Secret(password=PASSWORD))
    login.answer(10, SCRAM.encode() + b"\0\0")
    with pytest.raises(ConnectionError, match=message):
        for code, data in steps:
            login.answer(code, data)


def test_a_second_server_first_gets_no_second_proof():
    login = Login("alice", Secret(password=PASSWORD))
    _, client_first = _sasl_payload(login.answer(10, SCRAM.encode() + b"\0\0"))
    server_first = ScramServer(SCRAM, SECRET, None, ssl_in_use=False).first(client_first)
    login.answer(11, server_first)
    with pytest.raises(ConnectionError, match="unexpected SASL message from server"):
        login.answer(11, server_first)


def test_a_server_cannot_ask_for_endless_pbkdf2():
    login = Login("alice", Secret(password=PASSWORD))
    _, client_first = _sasl_payload(login.answer(10, SCRAM.encode() + b"\0\0"))
    nonce = client_first.split(b"r=", 1)[1]
    with pytest.raises(ConnectionError, match="SCRAM iteration count 2147483647 is more than pgfast computes"):
        login.answer(11, b"r=" + nonce + b"x,s=" + base64.b64encode(SALT) + b",i=2147483647")


def test_a_wrong_server_signature_is_refused():
    login = Login("alice", Secret(password=PASSWORD))
    _, client_first = _sasl_payload(login.answer(10, SCRAM.encode() + b"\0\0"))
    server = ScramServer(SCRAM, SECRET, None, ssl_in_use=False)
    login.answer(11, server.first(client_first))
    with pytest.raises(ConnectionError, match="incorrect server signature"):
        login.answer(12, b"v=" + base64.b64encode(b"\0" * 32))


@pytest.mark.parametrize("policy, code, data, message", [
    (Policy(require_auth="scram-sha-256"), 3, b"", 'authentication method requirement "scram-sha-256" failed: '
                                                   "server requested a cleartext password"),
    (Policy(require_auth="!md5"), 5, b"salt", 'authentication method requirement "!md5" failed: server requested '
                                              "a hashed password"),
    (Policy(require_auth="md5"), 0, b"", 'authentication method requirement "md5" failed: server did not '
                                         "complete authentication"),
    (Policy(channel_binding="require"), 3, b"", "channel binding required but not supported by server's "
                                                "authentication request"),
    (Policy(channel_binding="require"), 10, SCRAM.encode() + b"\0\0", "channel binding is required, but server did "
                                                                      "not offer an authentication method"),
    (Policy(channel_binding="require"), 0, b"", "channel binding required, but server authenticated client "
                                                "without channel binding"),
    (Policy(), 3, b"", "fe_sendauth: no password supplied"),
])
def test_what_the_policy_and_the_secret_refuse(policy, code, data, message):
    secret = Secret() if message.startswith("fe_sendauth") else Secret(password=PASSWORD)
    with pytest.raises(ConnectionError, match=message):
        Login("alice", secret, policy).answer(code, data, CB_DATA)


def test_md5_from_the_stored_hash():
    stored = "md5" + hashlib.md5(PASSWORD + b"alice").hexdigest()
    from_hash = Login("alice", Secret(md5=stored)).answer(5, b"salt")
    from_password = Login("alice", Secret(password=PASSWORD)).answer(5, b"salt")
    assert from_hash == from_password
