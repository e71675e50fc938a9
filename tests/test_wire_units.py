"""pgfast._framing and pgfast._pump against tests/wire_reference.py: the Cython hot path and a pure-Python
reference must agree on every input, including malformed ones and every way TCP can
split a stream. Random inputs come from seeded generators (reproducible failures)."""
from __future__ import annotations

import itertools
import random
import struct

import pytest
from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL

import certs
import wire_reference as ref
from pgfast import _framing, _pump

_lib = Binding().lib
IMPLEMENTATIONS = [pytest.param(_framing, id="cython"), pytest.param(ref, id="reference")]


def outcome(call, *args):
    """What a call returned, or which exception (type name and message) it raised."""
    try:
        return ("ok", call(*args))
    except Exception as exc:    # compared between implementations, so any kind counts
        return ("raised", type(exc).__name__, str(exc))


def startup_packet(code: int, body: bytes = b"") -> bytes:
    return struct.pack("!II", 8 + len(body), code) + body


def startup_message(params: list[tuple[bytes, bytes]], minor: int = 0) -> bytes:
    body = b"".join(k + b"\0" + v + b"\0" for k, v in params) + b"\0"
    return startup_packet(3 << 16 | minor, body)


def message(msg_type: bytes, payload: bytes = b"") -> bytes:
    return msg_type + struct.pack("!I", 4 + len(payload)) + payload


def splits(data: bytes, rng: random.Random, max_chunk: int | None = None) -> list[bytes]:
    """data cut at random places (chunk sizes 1 .. max_chunk)."""
    max_chunk = max_chunk or max(1, len(data))
    chunks, i = [], 0
    while i < len(data):
        n = rng.randint(1, max_chunk)
        chunks.append(data[i:i + n])
        i += n
    return chunks


# ---------------------------------------------------------------- constants and pack_int32

def test_constants_agree():
    for name in ("STARTUP_MIN_LENGTH", "STARTUP_MAX_LENGTH", "PROTOCOL_3_0", "CANCEL_REQUEST_CODE",
                 "SSL_REQUEST_CODE", "GSSENC_REQUEST_CODE"):
        assert getattr(_framing, name) == getattr(ref, name), name
    assert _framing.PROTOCOL_3_0 == 196608
    assert (_framing.CANCEL_REQUEST_CODE, _framing.SSL_REQUEST_CODE, _framing.GSSENC_REQUEST_CODE) == (
        80877102, 80877103, 80877104)
    # PostgreSQL: len -= 4; refused if len < 4 or len > MAX_STARTUP_PACKET_LENGTH (10000)
    assert (_framing.STARTUP_MIN_LENGTH, _framing.STARTUP_MAX_LENGTH) == (8, 10004)


def test_pack_int32():
    rng = random.Random(1)
    values = [0, 1, 255, 256, 2**31 - 1, 2**31, 2**32 - 1] + [rng.randrange(2**32) for _ in range(200)]
    for value in values:
        assert _framing.pack_int32(value) == ref.pack_int32(value) == struct.pack("!I", value)
    for bad in (-1, 2**32):
        assert outcome(_framing.pack_int32, bad)[:2] == outcome(ref.pack_int32, bad)[:2] == (
            "raised", "OverflowError")


# ---------------------------------------------------------------- ReadBuffer

def both_buffers():
    return _framing.ReadBuffer(), ref.ReadBuffer()


def same(buffers, method: str, *args):
    """Call method on both buffers; they must agree; return the Cython outcome."""
    results = [outcome(getattr(b, method), *args) for b in buffers]
    assert results[0] == results[1], (method, args, results)
    return results[0]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_startup_packet_split_at_every_byte(impl):
    packet = startup_message([(b"user", b"alice"), (b"database", b"db")])
    for cut in range(len(packet) + 1):
        buf = impl.ReadBuffer()
        buf.feed_data(packet[:cut])
        if cut < len(packet):
            assert buf.take_startup() is None
            assert buf.size() == cut
        buf.feed_data(packet[cut:])
        code, body = buf.take_startup()
        assert code == 196608 and body == packet[8:]
        assert buf.size() == 0 and buf.take_startup() is None and buf.first_byte() == -1


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_startup_packet_one_byte_at_a_time(impl):
    packets = [startup_packet(80877103), startup_packet(80877102, struct.pack("!iI", 42, 7)),
               startup_message([(b"user", b"u")], minor=1)]
    stream = b"".join(packets)
    buf, got = impl.ReadBuffer(), []
    for i in range(len(stream)):
        buf.feed_data(stream[i:i + 1])
        while (packet := buf.take_startup()) is not None:
            got.append(packet)
    assert got == [(struct.unpack("!I", p[4:8])[0], p[8:]) for p in packets]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("length,accepted", [
    (0, False), (4, False), (7, False), (8, True), (9, True), (10000, True), (10004, True),
    (10005, False), (10001 + 4, False), (2**31, False), (2**32 - 1, False)])
def test_startup_length_limits(impl, length, accepted):
    buf = impl.ReadBuffer()
    buf.feed_data(struct.pack("!I", length))       # the length alone decides a refusal
    if not accepted:
        with pytest.raises(impl.ProtocolViolation, match="^invalid length of startup packet$"):
            buf.take_startup()
        return
    assert buf.take_startup() is None
    buf.feed_data(struct.pack("!I", 196608)[:3])
    assert buf.take_startup() is None
    buf.feed_data(struct.pack("!I", 196608)[3:] + b"\0" * (length - 8 - 1))
    if length > 8:
        assert buf.take_startup() is None           # one byte short
        buf.feed_data(b"\0")
    assert buf.take_startup() == (196608, b"\0" * (length - 8))
    assert buf.size() == 0


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_take_message_lengths(impl):
    for length, max_length, ok in [(3, 100, False), (0, 100, False), (4, 100, True), (100, 100, True),
                                   (101, 100, False), (10000, 10000, True), (10001, 10000, False),
                                   (2**32 - 1, 2**31, False)]:
        buf = impl.ReadBuffer()
        buf.feed_data(b"Q" + struct.pack("!I", length))
        if not ok:
            with pytest.raises(impl.ProtocolViolation, match=f"^invalid message length {length}$"):
                buf.take_message(max_length)
            continue
        assert buf.take_message(max_length) is None if length > 4 else buf.take_message(max_length) == (
            ord("Q"), b"")
        if length > 4:
            buf.feed_data(b"x" * (length - 4))
            assert buf.take_message(max_length) == (ord("Q"), b"x" * (length - 4))
        assert buf.size() == 0


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_take_message_split_at_every_byte(impl):
    stream = message(b"R", struct.pack("!i", 0)) + message(b"S", b"a\0b\0") + message(b"Z", b"I")
    expected = [(ord("R"), b"\0\0\0\0"), (ord("S"), b"a\0b\0"), (ord("Z"), b"I")]
    for cut in range(len(stream) + 1):
        buf, got = impl.ReadBuffer(), []
        for part in (stream[:cut], stream[cut:]):
            buf.feed_data(part)
            while (msg := buf.take_message(1 << 20)) is not None:
                got.append(msg)
        assert got == expected


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_first_byte_size_take_all(impl):
    buf = impl.ReadBuffer()
    assert (buf.first_byte(), buf.size(), buf.take_all()) == (-1, 0, b"")
    buf.feed_data(b"")
    assert buf.first_byte() == -1
    buf.feed_data(b"\x16\x03\x01")
    assert (buf.first_byte(), buf.size()) == (0x16, 3)
    assert buf.take_startup() is None               # fewer than 4 bytes: no verdict yet
    buf.feed_data(b"\xff")
    assert buf.first_byte() == 0x16
    assert buf.take_all() == b"\x16\x03\x01\xff"
    assert (buf.first_byte(), buf.size()) == (-1, 0)
    buf.feed_data(startup_packet(80877103) + b"\x00\x01")
    assert buf.take_startup() == (80877103, b"")
    assert (buf.first_byte(), buf.size(), buf.take_all()) == (0, 2, b"\x00\x01")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_feed_data_only_takes_bytes(impl):
    buf = impl.ReadBuffer()
    for bad in (bytearray(b"x"), "x", None, memoryview(b"x")):
        with pytest.raises(TypeError):
            buf.feed_data(bad)
    assert buf.size() == 0


def test_read_buffers_agree_on_random_streams():
    """Random mixes of valid and broken packets, random chunking, random calls."""
    rng = random.Random(20261128)
    for _ in range(300):
        parts = []
        for _ in range(rng.randint(1, 8)):
            kind = rng.random()
            if kind < 0.4:
                parts.append(message(bytes([rng.choice(b"QDZXpRS")]), rng.randbytes(rng.randint(0, 40))))
            elif kind < 0.7:
                parts.append(startup_packet(rng.choice([196608, 80877103, 80877104, 80877102]),
                                            rng.randbytes(rng.randint(0, 30))))
            elif kind < 0.8:
                parts.append(struct.pack("!I", rng.choice([0, 3, 7, 10005, 2**31])) + rng.randbytes(4))
            else:
                parts.append(rng.randbytes(rng.randint(1, 12)))
        stream = b"".join(parts)
        buffers = both_buffers()
        for chunk in splits(stream, rng, max_chunk=rng.choice([1, 3, 16, 64])):
            same(buffers, "feed_data", chunk)
            for _ in range(rng.randint(0, 3)):
                method = rng.choice(["take_startup", "take_message", "first_byte", "size", "take_all"])
                args = (rng.choice([4, 20, 50, 1 << 20]),) if method == "take_message" else ()
                same(buffers, method, *args)
        same(buffers, "take_all")


def test_read_buffer_reuse_after_partial_and_full_consumption():
    """feed_data has two paths (everything consumed: start over; else append)."""
    rng = random.Random(7)
    buffers = both_buffers()
    expected = []
    stream = b"".join(message(b"D", rng.randbytes(rng.randint(0, 300))) for _ in range(500))
    pos = 0
    while pos < len(stream):
        n = rng.choice([1, 5, 6, 100, 4096])
        same(buffers, "feed_data", stream[pos:pos + n])
        pos += n
        while same(buffers, "take_message", 1 << 20)[1] is not None:
            pass
        expected.append(same(buffers, "size"))
    assert expected[-1] == ("ok", 0)


# ---------------------------------------------------------------- parse_startup_parameters

@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("body,expected", [
    (b"\0", []),
    (b"user\0alice\0\0", [("user", "alice")]),
    (b"user\0alice\0database\0db\0\0", [("user", "alice"), ("database", "db")]),
    (b"user\0\0\0", [("user", "")]),
    (b"user\0alice\0options\0-c x=1\0\0", [("user", "alice"), ("options", "-c x=1")]),
    (b"n\xff\0v\xfe\0\0", [("n\udcff", "v\udcfe")]),              # bytes kept for forwarding
    (b"\xc3\xa9\0\xe2\x82\xac\0\0", [("\u00e9", "\u20ac")]),
    (b"", "layout"),                            # no terminator at all (packet length 8)
    (b"user\0alice\0", "layout"),                # missing its terminator
    (b"user\0alice", "layout"),
    (b"user\0", "layout"),                       # a name without a value
    (b"user", "layout"),
    (b"user\0alice\0\0\0", "layout"),            # bytes after the terminator
    (b"user\0alice\0\0x\0y\0\0", "layout"),
    (b"\0\0", "layout"),
    (b"\0\0\0", "layout"),                       # an empty name is the terminator, not a parameter
    (b"user\0alice\0\0\0\0", "layout"),
    (b"\0user\0alice\0\0", "layout"),
    (b"user\0alice\0x", "layout"),              # PostgreSQL ignores a last lone byte; we do not
    (b"x", "layout"),
])
def test_parse_startup_parameters_cases(impl, body, expected):
    if expected == "layout":
        with pytest.raises(impl.ProtocolViolation,
                           match="^invalid startup packet layout: expected terminator as last byte$"):
            impl.parse_startup_parameters(body)
    else:
        assert impl.parse_startup_parameters(body) == expected


def test_parse_startup_parameters_agree_exhaustively():
    """Every body up to 8 bytes over {NUL, 'a', 0xff}, and random longer ones."""
    bodies = [bytes(p) for n in range(9) for p in itertools.product(b"\0a\xff", repeat=n)]
    rng = random.Random(3)
    bodies += [bytes(rng.choice(b"\0\0ab=") for _ in range(rng.randint(9, 60))) for _ in range(3000)]
    for body in bodies:
        assert outcome(_framing.parse_startup_parameters, body) == outcome(ref.parse_startup_parameters, body), body


# ---------------------------------------------------------------- MessageScanner

def scanner_state(scanner):
    return scanner.last_type, scanner.tx_status, scanner.at_boundary


def scan_both(chunks: list[bytes]):
    """Scan chunks with both scanners; they must agree after every chunk. Stops at a Terminate."""
    scanners = _framing.MessageScanner(), ref.MessageScanner()
    for chunk in chunks:
        results = [outcome(s.scan, chunk) for s in scanners]
        assert results[0] == results[1], (chunk, results)
        assert scanner_state(scanners[0]) == scanner_state(scanners[1]), chunk
        if results[0][0] == "raised" or results[0][1] != -1:
            return results[0], scanner_state(scanners[0])
    return ("ok", -1), scanner_state(scanners[0])


BACKEND_STREAM = (message(b"T", b"\0\x01a\0" + b"\0" * 18) + message(b"D", b"\0\x01\0\0\0\x011")
                  + message(b"C", b"SELECT 1\0") + message(b"Z", b"T")
                  + message(b"E", b"SERROR\0M\0\0") + message(b"Z", b"E")
                  + message(b"N", b"") + message(b"Z", b"I"))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_scanner_tracks_ready_for_query(impl):
    scanner = impl.MessageScanner()
    assert scanner_state(scanner) == (0, 0, True)
    assert scanner.scan(BACKEND_STREAM) == -1
    assert scanner_state(scanner) == (ord("Z"), ord("I"), True)
    assert scanner.scan(message(b"Z", b"T")[:5]) == -1
    assert scanner_state(scanner) == (ord("Z"), ord("I"), False)   # status byte still to come
    assert scanner.scan(b"T") == -1
    assert scanner_state(scanner) == (ord("Z"), ord("T"), True)


CLIENT_STREAM = (message(b"Q", b"select 1\0") + message(b"P", b"\0select 1\0\0\0") + message(b"B", b"\0" * 8)
                 + message(b"E", b"\0\0\0\0\0") + message(b"S", b"") + message(b"F", b"\0" * 10)
                 + message(b"d", b"copy data") + message(b"c", b""))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_scanner_counts_requests_and_readies(impl):
    client, backend = impl.MessageScanner(from_client=True), impl.MessageScanner()
    assert client.scan(CLIENT_STREAM) == -1
    assert (client.requests, client.readies) == (3, 0)      # Q, S, F; not P/B/E/d/c
    assert backend.scan(BACKEND_STREAM) == -1
    assert (backend.requests, backend.readies) == (0, 3)   # the backend's 'S' is ParameterStatus
    assert backend.scan(message(b"S", b"a\0b\0")) == -1 and backend.requests == 0


def test_scanner_counts_agree_at_every_split():
    for stream, from_client in ((CLIENT_STREAM, True), (BACKEND_STREAM, False)):
        for cut in range(len(stream) + 1):
            scanners = _framing.MessageScanner(from_client), ref.MessageScanner(from_client)
            for scanner in scanners:
                scanner.scan(stream[:cut])
                scanner.scan(stream[cut:])
            assert [(s.requests, s.readies) for s in scanners][0] == [(s.requests, s.readies) for s in scanners][1]


DDL_CASES = [
    (b"Q", b"drop database foo\0", 1), (b"Q", b"  DROP\n\tDATABASE x;\0", 1), (b"Q", b"create database y\0", 1),
    (b"P", b"stmt\0alter database x rename to y\0\0\0", 1), (b"P", b"\0DROP DATABASE z\0\0\0", 1),
    (b"Q", b"dropdatabase\0", 0), (b"Q", b"drop databases\0", 0), (b"Q", b"drop database_x\0", 0),
    (b"Q", b"select 'drop database x'\0", 0), (b"Q", b" " * 70 + b"drop database x\0", 0),
    (b"B", b"drop database\0", 0),
]


@pytest.mark.parametrize("msg_type,payload,expected", DDL_CASES)
def test_scanner_notices_database_ddl(msg_type, payload, expected):
    stream = message(msg_type, payload)
    for cut in range(len(stream) + 1):
        scanners = _framing.MessageScanner(True), ref.MessageScanner(True)
        for scanner in scanners:
            scanner.scan(stream[:cut])
            scanner.scan(stream[cut:])
        assert [s.database_ddl for s in scanners] == [expected, expected], cut
    assert _framing.MessageScanner(False).scan(stream) == -1   # the backend stream is never sniffed


def test_scanner_split_at_every_byte():
    for cut in range(len(BACKEND_STREAM) + 1):
        result, state = scan_both([BACKEND_STREAM[:cut], BACKEND_STREAM[cut:]])
        assert (result, state) == (("ok", -1), (ord("Z"), ord("I"), True))
    for a, b in itertools.combinations(range(len(BACKEND_STREAM) + 1), 2):
        result, state = scan_both([BACKEND_STREAM[:a], BACKEND_STREAM[a:b], BACKEND_STREAM[b:]])
        assert state == (ord("Z"), ord("I"), True)
    result, state = scan_both([BACKEND_STREAM[i:i + 1] for i in range(len(BACKEND_STREAM))])
    assert state == (ord("Z"), ord("I"), True)


def test_scanner_ready_for_query_status_split_across_chunks():
    rfq = message(b"Z", b"E")
    for cut in range(1, len(rfq)):
        for impl in (_framing, ref):
            scanner = impl.MessageScanner()
            scanner.scan(message(b"Z", b"I"))
            assert scanner.scan(rfq[:cut]) == -1
            assert scanner.tx_status == ord("I") and not scanner.at_boundary
            assert scanner.scan(rfq[cut:]) == -1
            assert scanner.tx_status == ord("E") and scanner.at_boundary


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_scanner_message_lengths(impl):
    for length in (4, 5, 8, 10000, 10001, 1 << 20):
        scanner = impl.MessageScanner()
        data = b"d" + struct.pack("!I", length) + b"x" * (length - 4)
        assert scanner.scan(data[:-1] if length > 4 else data) == -1
        assert scanner.at_boundary == (length == 4)
        if length > 4:
            assert scanner.scan(data[-1:]) == -1 and scanner.at_boundary
    for length in (0, 1, 3):
        with pytest.raises(impl.ProtocolViolation, match="^invalid message length$"):
            impl.MessageScanner().scan(b"d" + struct.pack("!I", length))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_scanner_terminate_in_the_middle_of_a_chunk(impl):
    before = message(b"Q", b"select 1\0") + message(b"P", b"\0select 'X'\0\0\0")
    stream = before + message(b"X") + message(b"Q", b"never\0")
    scanner = impl.MessageScanner()
    assert scanner.scan(stream) == len(before)
    assert scanner.at_boundary and scanner.last_type == ord("P")
    assert scanner.scan(stream[len(before):]) == 0          # a Terminate is not consumed
    # an 'X' inside a payload or a length word is no Terminate
    scanner = impl.MessageScanner()
    assert scanner.scan(message(b"d", b"XXXX") + b"Q" + struct.pack("!I", 0x58 + 4) + b"X" * 0x58) == -1
    assert scanner.at_boundary
    # a Terminate arriving after a message split across chunks
    scanner = impl.MessageScanner()
    assert scanner.scan(before[:7]) == -1
    assert scanner.scan(before[7:] + b"X\0\0\0\x04") == len(before) - 7


def test_scanners_agree_on_random_streams():
    rng = random.Random(99)
    for _ in range(400):
        msgs = []
        for _ in range(rng.randint(1, 12)):
            msg_type = bytes([rng.choice(b"ZZDCTEQdcXSN")])
            if msg_type == b"X" and rng.random() < 0.7:
                continue
            payload = rng.randbytes(rng.choice([0, 1, 1, 2, 5, 30, 300]))
            msgs.append(message(msg_type, payload))
        if rng.random() < 0.1:
            msgs.insert(rng.randrange(len(msgs) + 1), b"q" + struct.pack("!I", rng.randint(0, 3)))
        stream = b"".join(msgs)
        scan_both(splits(stream, rng, max_chunk=rng.choice([1, 2, 7, 50, 1000])))


# ---------------------------------------------------------------- TLS pump

@pytest.fixture(scope="module")
def server_context_factory():
    issued = certs.CA().server_cert()

    def make(version: int) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.use_certificate(issued.cert)
        ctx.use_privatekey(issued.key)
        ctx.set_min_proto_version(version)
        ctx.set_max_proto_version(version)
        ctx.set_options(SSL.OP_NO_TICKET)
        return ctx
    return make


PUMP_MAKERS = {"cython": _pump.pump_for, "reference": ref.pump_for}
VERSIONS = [pytest.param(SSL.TLS1_3_VERSION, id="tls1.3"), pytest.param(SSL.TLS1_2_VERSION, id="tls1.2")]


def client_receive_all(client: SSL.Connection, ciphertext: bytes) -> tuple[bytes, bool]:
    """(plaintext, closed) once the client has read all of ciphertext."""
    client.bio_write(ciphertext)
    out = []
    while True:
        try:
            out.append(client.recv(1 << 20))
        except SSL.WantReadError:
            return b"".join(out), False
        except SSL.ZeroReturnError:
            return b"".join(out), True


def client_ciphertext(client: SSL.Connection, plaintext: bytes) -> bytes:
    client.sendall(plaintext)
    out = []
    while True:
        try:
            out.append(client.bio_read(1 << 20))
        except SSL.WantReadError:
            return b"".join(out)


@pytest.fixture(params=VERSIONS)
def sessions(request, server_context_factory):
    """{'cython': (pump, client), 'reference': (pump, client)}, each on its own handshake."""
    ctx = server_context_factory(request.param)
    result = {}
    for name, make in PUMP_MAKERS.items():
        server, client = ref.handshake_in_memory(ctx)
        result[name] = (make(server), client)
    return result


def test_decrypt_records_fed_one_byte_at_a_time(sessions):
    """Same plaintext, same record layout: both pumps return the same thing after every byte."""
    messages = [b"x", b"select 1", bytes(range(256)) * 70, b"", b"end"]
    streams = {name: b"".join(client_ciphertext(client, m) for m in messages if m)
               for name, (pump, client) in sessions.items()}
    assert len(streams["cython"]) == len(streams["reference"])
    outputs = {name: [] for name in sessions}
    for i in range(len(streams["cython"])):
        for name, (pump, _) in sessions.items():
            outputs[name].append(pump.decrypt(streams[name][i:i + 1]))
    assert outputs["cython"] == outputs["reference"]
    assert b"".join(outputs["cython"]) == b"".join(messages)
    assert sum(1 for o in outputs["cython"] if o) >= len([m for m in messages if m])   # one per record


def test_decrypt_random_chunks(sessions):
    rng = random.Random(5)
    for name, (pump, client) in sessions.items():
        plaintext = rng.randbytes(200_000)
        stream = b"".join(client_ciphertext(client, p) for p in splits(plaintext, rng, 40_000))
        got = b"".join(pump.decrypt(chunk) for chunk in splits(stream, rng, 30_000))
        assert got == plaintext, name
        assert pump.decrypt(b"") == b"" and not pump.peer_closed


def test_one_mib_both_ways(sessions):
    payload = random.Random(11).randbytes(1 << 20)
    lengths = {}
    for name, (pump, client) in sessions.items():
        ciphertext = pump.encrypt(payload)
        lengths[name] = len(ciphertext)
        assert client_receive_all(client, ciphertext) == (payload, False), name
        assert pump.decrypt(client_ciphertext(client, payload)) == payload, name
    assert lengths["cython"] == lengths["reference"]
    assert (1 << 20) < lengths["cython"] < (1 << 20) + 64 * 300     # 64 records and their overhead


def test_encrypt_small_and_empty(sessions):
    for name, (pump, client) in sessions.items():
        assert pump.encrypt(b"") == b""
        for size in (1, 5, 16383, 16384, 16385):
            data = bytes(size)
            assert client_receive_all(client, pump.encrypt(data)) == (data, False), (name, size)


def test_peer_close_notify(sessions):
    for name, (pump, client) in sessions.items():
        before = client_ciphertext(client, b"last words")
        client.shutdown()
        alert = client.bio_read(1 << 16)
        assert pump.decrypt(before + alert) == b"last words", name
        assert pump.peer_closed
        assert pump.decrypt(client_ciphertext(client, b"") + b"junk") == b""     # nothing after close
        # half-close: the server side may still answer, then close itself
        assert client_receive_all(client, pump.encrypt(b"bye")) == (b"bye", False)
        assert client_receive_all(client, pump.close_notify()) == (b"", True)


def test_close_notify_from_the_pump(sessions):
    results = {}
    for name, (pump, client) in sessions.items():
        alert = pump.close_notify()
        assert alert, name
        results[name] = (len(alert), client_receive_all(client, alert))
        assert not pump.peer_closed
        assert pump.decrypt(client_ciphertext(client, b"late")) == b"late"   # the peer may still talk
        with pytest.raises(_pump.TLSError if name == "cython" else ref.TLSError):
            pump.encrypt(b"after close")                                  # but we may not
    assert results["cython"] == results["reference"]
    assert results["cython"][1] == (b"", True)


@pytest.mark.parametrize("where", ["payload", "header", "tag"])
def test_corrupted_record_raises_tls_error(sessions, where):
    errors = {}
    for name, (pump, client) in sessions.items():
        good = client_ciphertext(client, b"fine")
        assert pump.decrypt(good) == b"fine"
        record = bytearray(client_ciphertext(client, b"select 'tampered'"))
        position = {"payload": 10, "header": 0, "tag": len(record) - 1}[where]
        record[position] ^= 0x55
        module = _pump if name == "cython" else ref
        with pytest.raises(module.TLSError) as caught:
            pump.decrypt(bytes(record))
        errors[name] = str(caught.value)
        assert errors[name] and "SSL error code" not in errors[name]
        # failed for good: nothing more in or out, no close_notify
        assert pump.decrypt(client_ciphertext(client, b"more")) == b""
        with pytest.raises(module.TLSError, match="^connection already failed$"):
            pump.encrypt(b"x")
        assert pump.close_notify() == b""
        assert not pump.peer_closed
    assert errors["cython"] == errors["reference"]


def test_stale_openssl_error_is_not_blamed_on_the_connection(sessions, tmp_path):
    """An error some other code left on this thread's OpenSSL queue must not fail a healthy
    connection (PostgreSQL clears the queue before every SSL_read/SSL_write)."""
    for name, (pump, client) in sessions.items():
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        record = client_ciphertext(client, b"hello")
        for step in ("partial", "rest", "encrypt"):
            # a failed load leaves "No such file or directory" (and more) queued
            assert _lib.SSL_CTX_use_certificate_chain_file(ctx._context, str(tmp_path / "nope").encode()) != 1
            if step == "partial":
                assert pump.decrypt(record[:3]) == b"", name
            elif step == "rest":
                assert pump.decrypt(record[3:]) == b"hello", name
            else:
                assert client_receive_all(client, pump.encrypt(b"ok")) == (b"ok", False), name
        _lib.ERR_clear_error()


def test_tls_error_names_this_connections_failure_not_a_stale_one(sessions, tmp_path):
    errors = {}
    for name, (pump, client) in sessions.items():
        record = bytearray(client_ciphertext(client, b"tampered"))
        record[-1] ^= 1
        assert _lib.SSL_CTX_use_certificate_chain_file(
            SSL.Context(SSL.TLS_SERVER_METHOD)._context, str(tmp_path / "nope").encode()) != 1
        with pytest.raises(Exception) as caught:
            pump.decrypt(bytes(record))
        assert type(caught.value).__name__ == "TLSError"
        errors[name] = str(caught.value)
        assert _lib.ERR_peek_error() == 0, name       # nothing left behind either
    assert errors["cython"] == errors["reference"]
    assert "No such file" not in errors["cython"] and "SSL error code" not in errors["cython"]


def test_a_pump_is_made_only_from_a_connection_on_memory_bios(server_context_factory):
    with pytest.raises(TypeError):
        _pump.TLSPump()
    for wrong in (None, 12345, object(), SSL.Context(SSL.TLS_SERVER_METHOD)):
        with pytest.raises(TypeError):
            _pump.pump_for(wrong)
    import socket
    with socket.socket() as sock, pytest.raises(TypeError):
        _pump.pump_for(SSL.Connection(server_context_factory(SSL.TLS1_3_VERSION), sock))
    assert not hasattr(_pump, "install_openssl_calls")
    server, _ = ref.handshake_in_memory(server_context_factory(SSL.TLS1_3_VERSION))
    pump = _pump.pump_for(server)
    assert not pump.peer_closed and not pump.failed and pump.pending_ciphertext() == b""


# ---------------------------------------------------------------- what makes a backend clean

TRAILING_CASES = [
    # (client stream, trailing after it): a request (Query, Sync, FunctionCall) covers what came
    # before it; anything else after the last one is work no ReadyForQuery has answered yet
    (message(b"Q", b"select 1\0"), 0),
    (message(b"P", b"\0select 1\0\0\0") + message(b"B", b"\0" * 8) + message(b"E", b"\0\0\0\0\0"), 3),
    (message(b"P", b"\0select 1\0\0\0") + message(b"H"), 2),           # a Flush behind work counts
    (message(b"P", b"\0select 1\0\0\0") + message(b"S"), 0),
    (message(b"H"), 0),                                                 # a lone Flush changes nothing
    (message(b"S") + message(b"H") + message(b"H"), 0),
    (message(b"Q", b"copy t from stdin\0") + message(b"d", b"1\n") + message(b"c"), 0),
    (message(b"Q", b"select 1\0") + message(b"P", b"\0select 2\0\0\0"), 1),
    (message(b"D", b"S\0") + message(b"C", b"S\0"), 2),                 # Describe, Close without Sync
    (message(b"F", b"\0" * 10), 0),
]


@pytest.mark.parametrize("stream,trailing", TRAILING_CASES)
def test_scanner_counts_work_after_the_last_request(stream, trailing):
    for cut in range(len(stream) + 1):
        scanners = _framing.MessageScanner(True), ref.MessageScanner(True)
        for scanner in scanners:
            scanner.scan(stream[:cut])
            scanner.scan(stream[cut:])
        assert [s.trailing for s in scanners] == [trailing, trailing], cut
    assert _framing.MessageScanner(False).scan(stream) == -1 and _framing.MessageScanner(False).trailing == 0


def record_lengths(ciphertext: bytes) -> list[tuple[int, int]]:
    """(content type, length) of each TLS record."""
    records, i = [], 0
    while i < len(ciphertext):
        content_type, length = ciphertext[i], struct.unpack_from("!H", ciphertext, i + 3)[0]
        records.append((content_type, length))
        i += 5 + length
    assert i == len(ciphertext)
    return records


def test_no_record_carries_more_than_postgresql_would(sessions):
    """libpq's reader relies on records of at most 8192 bytes of plaintext (PostgreSQL's send
    buffer): plaintext left inside OpenSSL would never wake its select()."""
    for name, (pump, client) in sessions.items():
        payload = random.Random(1).randbytes(100_000)
        ciphertext = pump.encrypt(payload)
        data_records = [length for content_type, length in record_lengths(ciphertext) if content_type == 23]
        assert len(data_records) == 13, name               # ceil(100000 / 8192)
        assert max(data_records) <= 8192 + 64, name        # plaintext plus tag and padding
        assert client_receive_all(client, ciphertext) == (payload, False), name
