"""Message framing: ReadBuffer.take_message(max_length) on an arbitrary byte stream,
split at arbitrary points.

Input: data[0] picks max_length (MAX_LENGTHS), data[1] % 64 = k, the next k bytes are
chunk sizes (byte + 1; once they run out the rest is one chunk), the rest is the stream.

The stream is framed four ways: fed whole; fed in the fuzzer's chunks; fed one byte at a
time (streams up to 4 KiB); and fed whole to the pure-Python reference
(tests/wire_reference.py). After each feed every complete message is taken
(take_message until None or ProtocolViolation). All four must give the same messages,
the same end (a ProtocolViolation with the same message, or None), and the same bytes
left over (size(), then take_all()). The messages taken must also be exactly the
stream's prefix, re-framed. Only ProtocolViolation may be raised.
"""
from __future__ import annotations

import _harness
from _harness import fail, split_stream

with _harness.instrumented():
    from pgfast import _framing
    import wire_reference

MAX_LENGTHS = (65535, 1 << 20, 1 << 24, 4, 5, 8, 16, 100, 1000, 2**31 - 1, 2**32 - 1, 0)


def frame(module, chunks: list[bytes], max_length: int):
    buf = module.ReadBuffer()
    taken, end = [], None
    fed = 0
    for chunk in chunks:
        buf.feed_data(chunk)
        fed += len(chunk)
        while True:
            try:
                msg = buf.take_message(max_length)
            except module.ProtocolViolation as exc:
                end = ("violation", str(exc))
                break
            if msg is None:
                break
            taken.append(msg)
        if end is not None:
            break
        consumed = sum(5 + len(p) for _, p in taken)
        if buf.size() != fed - consumed:
            fail("framing.size", f"size() {buf.size()} != fed {fed} - consumed {consumed}")
    left = buf.size()
    rest = buf.take_all()
    if len(rest) != left or buf.size() != 0:
        fail("framing.take_all", f"take_all() gave {len(rest)} bytes, size() said {left}")
    return taken, end, rest


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    max_length = MAX_LENGTHS[data[0] % len(MAX_LENGTHS)]
    stream, chunks = split_stream(data[1:])

    whole = frame(_framing, [stream], max_length)
    runs = {"split": frame(_framing, chunks, max_length),
            "reference": frame(wire_reference, [stream], max_length)}
    if len(stream) <= 4096:
        runs["bytewise"] = frame(_framing, [stream[j:j + 1] for j in range(len(stream))], max_length)
    for name, (taken, end, rest) in runs.items():
        if taken != whole[0]:
            n = next((j for j, (a, b) in enumerate(zip(taken, whole[0])) if a != b), min(len(taken), len(whole[0])))
            fail(f"framing.{name}-messages-differ",
                 f"max_length={max_length}: message {n}: {taken[n:n + 1]!r} vs whole {whole[0][n:n + 1]!r}")
        if end != whole[1]:
            fail(f"framing.{name}-end-differs", f"{end!r} vs whole {whole[1]!r}")
        # fed in pieces, the stream stops being fed at a violation: what is left is then a prefix
        if rest != whole[2] and not (end is not None and name != "reference" and whole[2].startswith(rest)):
            fail(f"framing.{name}-rest-differs", f"{rest[:32]!r} vs whole {whole[2][:32]!r}")
    taken, end, rest = whole
    reframed = b"".join(bytes([t]) + (len(p) + 4).to_bytes(4, "big") + p for t, p in taken)
    if stream[:len(reframed)] != reframed:
        fail("framing.not-a-prefix", "the messages taken are not the stream's first bytes")
    if end is None and reframed + rest != stream:
        fail("framing.lost-bytes", f"{len(reframed)} framed + {len(rest)} left != {len(stream)}")
    if end is None and len(rest) >= 5:
        length = int.from_bytes(rest[1:5], "big")
        if 4 <= length <= max_length and len(rest) >= 1 + length:
            fail("framing.whole-message-left", f"a complete message of length {length} was not taken")


if __name__ == "__main__":
    _harness.main(test_one_input)
