"""pgfast._framing and pgfast._pump (Cython) beside tests/wire_reference.py (pure Python), one group per function.

    python -m pytest bench/micro --benchmark-only
"""
from __future__ import annotations

import struct

import pytest
from micro_support import record_throughput, reference

from pgfast import _framing, _pump

IMPLS = [pytest.param(("cython", _framing, _pump.pump_for), id="cython"),
         pytest.param(("reference", reference, reference.pump_for), id="reference")]

RECORD = 16 * 1024          # TLS plaintext per record (the TLS maximum)
RECORDS_PER_CALL = 64       # 1 MiB per benchmarked call
CHUNK = 64 * 1024           # what one socket read hands the relay


def message(msg_type: bytes, payload: bytes) -> bytes:
    return msg_type + struct.pack("!I", 4 + len(payload)) + payload


def data_row(*columns: bytes) -> bytes:
    return message(b"D", struct.pack("!H", len(columns))
                   + b"".join(struct.pack("!I", len(c)) + c for c in columns))


def accounts_rows(total: int) -> bytes:
    """DataRow messages shaped like pgbench_accounts rows (aid, bid, abalance, 84-char filler)."""
    rows, size, aid = [], 0, 1
    while size < total:
        row = data_row(str(aid).encode(), b"1", b"0", b" " * 84)
        rows.append(row)
        size += len(row)
        aid += 1
    return b"".join(rows)


def startup_packet() -> bytes:
    """What psql 15 sends (PQconnectdb with a typical connection string)."""
    params = [(b"user", b"postgres"), (b"database", b"postgres"), (b"application_name", b"psql"),
              (b"client_encoding", b"UTF8"), (b"options", b"-c search_path=public")]
    body = b"".join(k + b"\0" + v + b"\0" for k, v in params) + b"\0"
    return struct.pack("!II", 8 + len(body), 3 << 16) + body


# ---------------------------------------------------------------- startup packet

@pytest.mark.parametrize("impl", IMPLS)
def test_startup_packet(benchmark, impl):
    name, mod, _ = impl
    benchmark.group = "startup-packet: take_startup + parse"
    packet = startup_packet()

    def parse():
        buf = mod.ReadBuffer()
        buf.feed_data(packet)
        code, body = buf.take_startup()
        return code, mod.parse_startup_parameters(body)

    code, params = benchmark(parse)
    assert code == 196608 and params[0] == ("user", "postgres") and len(params) == 5
    record_throughput(benchmark, name, 1, "packets/s")


# ---------------------------------------------------------------- framing

@pytest.mark.parametrize("impl", IMPLS)
def test_take_message_datarows(benchmark, impl):
    name, mod, _ = impl
    benchmark.group = "framing: ReadBuffer.take_message, 64 KiB of DataRows"
    stream = accounts_rows(CHUNK)
    expected = stream.count(b"D\x00\x00\x00")        # every row starts with D and a small length

    def frame():
        buf = mod.ReadBuffer()
        buf.feed_data(stream)
        count = 0
        while buf.take_message(1 << 30) is not None:
            count += 1
        return count

    count = benchmark(frame)
    assert count == expected
    record_throughput(benchmark, name, len(stream), "MB/s")
    record_throughput(benchmark, name, count, "messages/s")


@pytest.mark.parametrize("kind", ["datarow", "copydata"])
@pytest.mark.parametrize("impl", IMPLS)
def test_scan_64k_chunks(benchmark, impl, kind):
    name, mod, _ = impl
    benchmark.group = f"framing: MessageScanner.scan, 1 MiB of {kind} in 64 KiB chunks"
    if kind == "datarow":
        stream = accounts_rows(1 << 20) + message(b"C", b"SELECT 1\0") + message(b"Z", b"I")
    else:       # COPY TO STDOUT's rows of the bulk scenario: 'd' messages of 1001 bytes
        row = message(b"d", b"x" * 1000 + b"\n")
        stream = row * ((1 << 20) // len(row)) + message(b"c", b"") + message(b"Z", b"I")
    chunks = [stream[i:i + CHUNK] for i in range(0, len(stream), CHUNK)]

    def scan():
        scanner = mod.MessageScanner()
        for chunk in chunks:
            if scanner.scan(chunk) != -1:
                raise AssertionError("no Terminate in this stream")
        return scanner

    scanner = benchmark(scan)
    assert scanner.at_boundary and scanner.tx_status == ord("I")
    record_throughput(benchmark, name, len(stream), "MB/s")


# ---------------------------------------------------------------- TLS pump

@pytest.mark.parametrize("impl", IMPLS)
def test_tls_encrypt_16k_records(benchmark, impl, tls_pair):
    name, _, make_pump = impl
    benchmark.group = "TLS pump: encrypt, 16 KiB records"
    server, client = tls_pair
    pump = make_pump(server)
    record = bytes(range(256)) * (RECORD // 256)

    # first, once: the client reads what the pump writes
    client.bio_write(pump.encrypt(record))
    got = b""
    while len(got) < len(record):
        got += client.recv(1 << 20)
    assert got == record

    def encrypt():
        size = 0
        for _ in range(RECORDS_PER_CALL):
            size += len(pump.encrypt(record))
        return size

    size = benchmark(encrypt)
    assert size > RECORD * RECORDS_PER_CALL           # plaintext + per-record overhead
    record_throughput(benchmark, name, RECORD * RECORDS_PER_CALL, "MB/s")
    benchmark.extra_info["cipher"] = server.get_cipher_name()


@pytest.mark.parametrize("impl", IMPLS)
def test_tls_decrypt_16k_records(benchmark, impl, tls_pair):
    name, _, make_pump = impl
    benchmark.group = "TLS pump: decrypt, 16 KiB records"
    server, client = tls_pair
    pump = make_pump(server)
    record = bytes(range(256)) * (RECORD // 256)

    def ciphertext():
        # fresh records every round: each carries the next sequence number
        out = []
        for _ in range(RECORDS_PER_CALL):
            client.sendall(record)
            out.append(client.bio_read(1 << 20))
        return (out,), {}

    def decrypt(records):
        size = 0
        for r in records:
            size += len(pump.decrypt(r))
        return size

    size = benchmark.pedantic(decrypt, setup=ciphertext, rounds=200 if name == "cython" else 60, iterations=1,
                              warmup_rounds=2)
    assert size == RECORD * RECORDS_PER_CALL
    record_throughput(benchmark, name, RECORD * RECORDS_PER_CALL, "MB/s")
    benchmark.extra_info["cipher"] = server.get_cipher_name()
