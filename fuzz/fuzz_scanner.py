"""pgfast._framing.MessageScanner against itself under every split and against the
pure-Python reference (tests/wire_reference.py).

Input: data[0] bit 0 = from_client; data[1] % 64 = k, the next k bytes are chunk sizes
(byte + 1; once they run out the rest is one chunk), the rest is the relayed stream.

The stream is scanned as the relay scans it (chunk after chunk, stopping at the first
Terminate offset or ProtocolViolation) by:
  - the Cython scanner, whole;
  - the Cython scanner and the reference, in the fuzzer's chunks, in lockstep: after
    every chunk both must have returned the same thing (or raised the same) and be in
    the same state;
  - the Cython scanner one byte at a time (streams up to 4 KiB).
All must end with the same absolute Terminate offset (or none, or a violation) and the
same state: requests, readies, trailing, tx_status, last_type, database_ddl,
at_boundary. A Terminate is not consumed: scanning from it again finds it at 0. Only
ProtocolViolation may be raised.
"""
from __future__ import annotations

import _harness
from _harness import fail, split_stream

with _harness.instrumented():
    from pgfast import _framing
    import wire_reference

FIELDS = ("requests", "readies", "trailing", "tx_status", "last_type", "database_ddl", "at_boundary")


def state(scanner) -> tuple:
    return tuple(getattr(scanner, f) for f in FIELDS)


def scan_one(scanner, module, chunk: bytes):
    try:
        return ("ok", scanner.scan(chunk))
    except module.ProtocolViolation as exc:
        return ("violation", str(exc))


def relay(module, from_client: bool, chunks: list[bytes], twin=None):
    """(end, state): end is ("terminate", absolute offset), ("violation", msg) or ("ok",)."""
    scanner = module.MessageScanner(from_client)
    other = wire_reference.MessageScanner(from_client) if twin else None
    offset = 0
    for chunk in chunks:
        result = scan_one(scanner, module, chunk)
        if other is not None:
            ref_result = scan_one(other, wire_reference, chunk)
            if result != ref_result:
                fail("scanner.differs-from-reference", f"at stream offset {offset}: cython {result!r} "
                                                       f"reference {ref_result!r}")
            if state(scanner) != state(other):
                fail("scanner.state-differs-from-reference",
                     f"at stream offset {offset}: cython {dict(zip(FIELDS, state(scanner)))} "
                     f"reference {dict(zip(FIELDS, state(other)))}")
        if result[0] == "violation":
            return result, state(scanner)
        if result[1] >= 0:
            cut = result[1]
            if not (0 <= cut < len(chunk) and chunk[cut] == ord("X")):
                fail("scanner.bad-terminate-offset", f"{cut} in a chunk of {len(chunk)}")
            before = state(scanner)
            if scanner.scan(chunk[cut:]) != 0 or state(scanner) != before:
                fail("scanner.terminate-consumed", "scanning from the Terminate again did not stop at 0")
            return ("terminate", offset + cut), state(scanner)
        offset += len(chunk)
    return ("ok",), state(scanner)


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    from_client = bool(data[0] & 1)
    stream, chunks = split_stream(data[1:])

    whole = relay(_framing, from_client, [stream])
    runs = {"split": relay(_framing, from_client, chunks, twin=True),
            "reference-whole": relay(wire_reference, from_client, [stream])}
    if len(stream) <= 4096:
        runs["bytewise"] = relay(_framing, from_client, [stream[j:j + 1] for j in range(len(stream))])
    for name, result in runs.items():
        if result != whole:
            fail(f"scanner.{name}-differs-from-whole",
                 f"from_client={from_client}: {name} {result[0]!r} {dict(zip(FIELDS, result[1]))} "
                 f"vs whole {whole[0]!r} {dict(zip(FIELDS, whole[1]))}")


if __name__ == "__main__":
    _harness.main(test_one_input)
