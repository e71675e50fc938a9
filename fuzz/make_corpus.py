"""Writes the seed corpora fuzz/corpus/<target>/ : real, valid inputs in each target's
input format (see the docstring of each fuzz_*.py). Deterministic: the same files on
every run (fixed nonces and salts), so the seeds can be committed.

    python fuzz/make_corpus.py
"""
from __future__ import annotations

import base64
import hashlib
import os
import shutil
import struct
import sys

import scramp

FUZZ_DIR = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(FUZZ_DIR, "corpus")

PROTOCOL_3_0 = 3 << 16
CANCEL = 1234 << 16 | 5678
SSL = 1234 << 16 | 5679
GSSENC = 1234 << 16 | 5680


def u16(n: int) -> bytes:
    return struct.pack("!H", n)


def chunk(data: bytes) -> bytes:
    return u16(len(data)) + data


def message(t: bytes, payload: bytes = b"") -> bytes:
    return t + struct.pack("!I", len(payload) + 4) + payload


def startup_packet(code: int, body: bytes = b"") -> bytes:
    return struct.pack("!II", 8 + len(body), code) + body


def startup_message(params: list[tuple[bytes, bytes]], minor: int = 0) -> bytes:
    body = b"".join(k + b"\0" + v + b"\0" for k, v in params) + b"\0"
    return startup_packet(PROTOCOL_3_0 | minor, body)


def cstr(s: bytes) -> bytes:
    return s + b"\0"


# --- real protocol streams ------------------------------------------------------------------

STARTUP = startup_message([(b"user", b"alice"), (b"database", b"db"), (b"application_name", b"psql"),
                           (b"client_encoding", b"UTF8")])
SSL_REQUEST = startup_packet(SSL)
GSSENC_REQUEST = startup_packet(GSSENC)
CANCEL_REQUEST = startup_packet(CANCEL, struct.pack("!iI", 4242, 0xDEADBEEF))
# a TLS 1.3 ClientHello's record header and handshake header (direct SSL, PostgreSQL 17)
CLIENT_HELLO_HEAD = bytes.fromhex("160301012c0100012803") + bytes(32)


def extended_query(sql: bytes, params: list[bytes]) -> bytes:
    bind_params = b"".join(struct.pack("!i", len(p)) + p for p in params)
    return (message(b"P", cstr(b"") + cstr(sql) + struct.pack("!h", 0))
            + message(b"B", cstr(b"") + cstr(b"") + struct.pack("!hh", 0, len(params)) + bind_params
                      + struct.pack("!h", 0))
            + message(b"D", b"P" + cstr(b""))
            + message(b"E", cstr(b"") + struct.pack("!i", 0))
            + message(b"S"))


CLIENT_STREAM = (message(b"Q", cstr(b"SELECT 1"))
                 + extended_query(b"SELECT $1::int", [b"42"])
                 + message(b"H")
                 + message(b"Q", cstr(b"DROP DATABASE scratch"))
                 + message(b"P", cstr(b"s1") + cstr(b"  create\n database x") + struct.pack("!h", 0)) + message(b"S")
                 + message(b"Q", cstr(b"COPY t FROM STDIN"))
                 + message(b"d", b"1\tone\n") + message(b"c")
                 + message(b"F", struct.pack("!i", 1598) + struct.pack("!hh", 0, 0) + struct.pack("!h", 0))
                 + message(b"X"))

BACKEND_STREAM = (message(b"R", struct.pack("!i", 0))
                  + message(b"S", cstr(b"server_version") + cstr(b"16.2"))
                  + message(b"K", struct.pack("!iI", 4242, 0xDEADBEEF))
                  + message(b"Z", b"I")
                  + message(b"T", struct.pack("!h", 1) + cstr(b"?column?") + struct.pack("!ihihih", 0, 0, 23, 4, -1, 0))
                  + message(b"D", struct.pack("!h", 1) + struct.pack("!i", 1) + b"1")
                  + message(b"C", cstr(b"SELECT 1"))
                  + message(b"Z", b"T")
                  + message(b"E", b"SERROR\0C42601\0Msyntax error\0\0")
                  + message(b"Z", b"E"))


# --- real SCRAM messages (scramp, fixed nonces and salt) --------------------------------------

SALT = bytes(range(16))
PASSWORD = "secret"


def pg_secret(password: str, iterations: int = 4096, salt: bytes = SALT) -> str:
    salt_, stored, server, i = scramp.ScramMechanism("SCRAM-SHA-256").make_auth_info(
        password, iteration_count=iterations, salt=salt)
    b64 = lambda b: base64.b64encode(b).decode()
    return f"SCRAM-SHA-256${i}:{b64(salt_)}${b64(stored)}:{b64(server)}"


def scram_messages(mechanism: str = "SCRAM-SHA-256", cb: bytes | None = None) -> tuple[str, str]:
    """(client-first, client-final) of a whole scramp exchange, with libpq's empty user name."""
    auth_info = scramp.ScramMechanism(mechanism).make_auth_info(PASSWORD, salt=SALT)
    binding = ("tls-server-end-point", cb) if cb else None
    client = scramp.ScramClient([mechanism], "alice", PASSWORD, channel_binding=binding,
                                c_nonce="rOprNGfwEbeRWgbNEkqO")
    server = scramp.ScramMechanism(mechanism).make_server(lambda _u: auth_info, channel_binding=binding,
                                                          s_nonce="%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0")
    first = client.get_client_first()
    server.set_client_first(first)
    client.set_server_first(server.get_server_first())
    final = client.get_client_final()
    server.set_client_final(final)
    client.set_server_final(server.get_server_final())
    return first.replace("n=alice,", "n=,"), final      # libpq sends an empty name


CB = hashlib.sha256(b"a server certificate").digest()
FIRST, FINAL = scram_messages()
FIRST_PLUS, FINAL_PLUS = scram_messages("SCRAM-SHA-256-PLUS", CB)


def sasl_initial(mechanism: str, client_first: str | None) -> bytes:
    data = struct.pack("!i", -1) if client_first is None else chunk4(client_first.encode())
    return cstr(mechanism.encode()) + data


def chunk4(data: bytes) -> bytes:
    return struct.pack("!i", len(data)) + data


AUTO = b"\xf0" + chunk(b"")      # fuzz_auth: "answer the last request correctly"


def auth_seeds() -> dict[str, bytes]:
    s = {
        "initial_mechanism": b"\x00" + sasl_initial("SCRAM-SHA-256", FIRST),
        "initial_mechanism_plus": b"\x00" + sasl_initial("SCRAM-SHA-256-PLUS", FIRST_PLUS),
        "initial_data": b"\x01" + chunk4(FIRST.encode()),
        "initial_data_none": b"\x01" + struct.pack("!i", -1),
        "scram_input_first": b"\x02" + FIRST.encode(),
        "scram_input_final": b"\x02" + FINAL.encode(),
        "cb_flag_n": b"\x03\x00\x01" + FIRST.encode(),
        "cb_flag_p": b"\x03\x01\x01" + FIRST_PLUS.encode(),
        "cb_flag_y": b"\x03\x00\x01" + ("y" + FIRST[1:]).encode(),
        # mechanism, channel binding, mock, user, client-first, auto, final / mutation
        "scram_server_auto": b"\x04\x00\x00\x00\x00" + chunk(FIRST.encode()) + b"\x01" + chunk(b""),
        "scram_server_plus_auto": b"\x04\x01\x01\x00\x00" + chunk(FIRST_PLUS.encode()) + b"\x01" + chunk(b""),
        "scram_server_mock": b"\x04\x00\x00\x01\x00" + chunk(FIRST.encode()) + b"\x01" + chunk(b""),
        "scram_server_final": b"\x04\x00\x00\x00\x00" + chunk(FIRST.encode()) + b"\x00" + chunk(FINAL.encode()),
        "parse_scram": b"\x05\x00" + pg_secret(PASSWORD).encode(),
        "check_plain_scram": b"\x05\x01" + chunk(pg_secret(PASSWORD).encode()) + chunk(b"secret") + b"alice",
        "check_plain_md5": b"\x05\x01" + chunk(("md5" + hashlib.md5(b"secretalice").hexdigest()).encode())
        + chunk(b"secret") + b"alice",
        "check_plain_text": b"\x05\x01" + chunk(b"secret") + chunk(b"secret") + b"alice",
        "pg_secret": b"\x05\x02\x00\x00" + b"correct horse battery staple",
        "pg_secret_unicode": b"\x05\x02\x00\x00" + "p\u00e4ssw\u00f6rd".encode(),
    }
    # exchange: method, credentials kind, channel binding, password_encryption, user, messages
    methods = {"scram": 0, "md5": 1, "password": 2}
    kinds = {"scram": 0, "md5": 1, "plain": 2, "none-role": 3}
    for method, m in methods.items():
        for kind, k in kinds.items():
            s[f"exchange_{method}_{kind}"] = b"\x06" + bytes([m, k, 0, 0, 0]) + AUTO + AUTO
    s["exchange_scram_plus"] = b"\x06" + bytes([0, 0, 1, 0, 0]) + AUTO + AUTO
    s["exchange_scram_literal"] = (b"\x06" + bytes([0, 0, 0, 0, 0]) + b"p" + chunk(sasl_initial("SCRAM-SHA-256", FIRST))
                                   + b"p" + chunk(FINAL.encode()))
    s["exchange_scram_no_initial"] = (b"\x06" + bytes([0, 0, 0, 0, 0]) + b"p" + chunk(sasl_initial("SCRAM-SHA-256", None))
                                      + AUTO + AUTO)
    s["exchange_password_literal"] = b"\x06" + bytes([2, 0, 0, 0, 0]) + b"p" + chunk(b"secret\0")
    # credentials kind 9: the secret text comes from the input (here: real ones)
    md5_alice = ("md5" + hashlib.md5(b"secretalice").hexdigest()).encode()
    s["exchange_password_fuzz_secret"] = b"\x06" + bytes([2, 9, 0, 0, 0]) + chunk(md5_alice) + AUTO
    s["exchange_md5_fuzz_secret"] = b"\x06" + bytes([1, 9, 0, 0, 0]) + chunk(md5_alice) + AUTO
    s["exchange_scram_fuzz_secret"] = (b"\x06" + bytes([0, 9, 0, 0, 0]) + chunk(pg_secret(PASSWORD).encode())
                                       + AUTO + AUTO)
    return s


def seeds() -> dict[str, dict[str, bytes]]:
    ops_bytewise = bytes([0, 2, 0, 2, 0, 2, 0, 2, 8 * 3, 2, 1, 2, 7, 2])
    return {
        "startup": {
            "startup_message": b"\x00" + STARTUP,
            "ssl_then_startup": b"\x00" + SSL_REQUEST + STARTUP,
            "gssenc_then_startup": b"\x00" + GSSENC_REQUEST + STARTUP,
            "cancel_request": b"\x00" + CANCEL_REQUEST,
            "client_hello": b"\x00" + CLIENT_HELLO_HEAD,
            "startup_minor2_pq_option": b"\x00" + startup_message(
                [(b"user", b"bob"), (b"_pq_.compression", b"on"), (b"replication", b"database")], minor=2),
            "startup_replication": b"\x00" + startup_message([(b"user", b"rep"), (b"replication", b"true")]),
            "startup_then_password": b"\x00" + STARTUP + message(b"p", b"secret\0"),
            "startup_bytewise": bytes([len(ops_bytewise)]) + ops_bytewise + SSL_REQUEST + STARTUP,
        },
        "framing": {
            "client_stream": b"\x00\x00" + CLIENT_STREAM,
            "backend_stream": b"\x01\x00" + BACKEND_STREAM,
            "client_stream_split": b"\x00\x06" + bytes([0, 3, 4, 9, 1, 200]) + CLIENT_STREAM,
            "sasl_messages": b"\x00\x00" + message(b"p", sasl_initial("SCRAM-SHA-256", FIRST))
            + message(b"p", FINAL.encode()),
            "startup_reply": b"\x02\x02\x04\x00" + message(b"R", struct.pack("!i", 10) + b"SCRAM-SHA-256\0\0"),
        },
        "scanner": {
            "client_stream": b"\x01\x00" + CLIENT_STREAM,
            "client_stream_split": b"\x01\x08" + bytes([0, 0, 0, 3, 4, 10, 1, 63]) + CLIENT_STREAM,
            "backend_stream": b"\x00\x00" + BACKEND_STREAM,
            "backend_stream_split": b"\x00\x05" + bytes([4, 0, 5, 2, 17]) + BACKEND_STREAM,
            "pipelined_extended": b"\x01\x00" + extended_query(b"ALTER DATABASE db SET work_mem = '64MB'", [])
            + extended_query(b"INSERT INTO t VALUES ($1)", [b"x" * 100]),
        },
        "auth": auth_seeds(),
        "upstream": {
            "conninfo_keywords": b"\x00host=db1,db2 port=5432,5433 sslmode=verify-full sslrootcert=ca.crt "
                                 b"password=secret1 target_session_attrs=read-write connect_timeout=5",
            "conninfo_uri": b"\x00postgresql://app:secret1@[::1]:5432,db2/app?sslmode=require&application_name=x",
            "conninfo_quoted": b"\x00host='db 1' options='-c search_path=a\\'b' sslnegotiation=direct",
            "passfile": b"\x01" + u16(2) + b"db" + u16(5432) + u16(3) + b"app" + u16(5) + b"alice" + b"\x00"
                        + b"# comment\ndb:5432:app:alice:pa\\:ss\n*:*:*:*:other\n",
            "scram_correct": b"\x02\x01\x01" + bytes(range(12)),
            "scram_keys_correct": b"\x02\x00\x01" + bytes(range(12)),
            "scram_bad_first": b"\x02\x01\x00" + u16(20) + b"r=abc,s=QUJD,i=4096xx",
            "login_sasl": b"\x03\x02\x02" + u16(15) + b"SCRAM-SHA-256\0\0" + b"\x03" + u16(60)
                          + b"r=" + b"A" * 30 + b",s=" + base64.b64encode(bytes(16)) + b",i=4096",
            "login_md5": b"\x03\x03\x01" + u16(4) + b"salt",
        },
    }


def main() -> None:
    for target, files in seeds().items():
        directory = os.path.join(CORPUS, target)
        if os.path.isdir(directory):
            shutil.rmtree(directory)
        os.makedirs(directory)
        for name, data in files.items():
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)
        print(f"{directory}: {len(files)} seeds")


if __name__ == "__main__":
    sys.exit(main())
