"""Plumbing shared by the fuzz targets: atheris when it is importable, else a seeded
mutation loop with the same command line, plus --repro and --minimize.

A target does:

    import _harness
    with _harness.instrumented():          # atheris instruments what is imported here
        from pgfast import ...
    def test_one_input(data: bytes) -> None: ...
    if __name__ == "__main__":
        _harness.main(test_one_input)

and signals an invariant violation with _harness.fail(label, detail) (a Finding).
Any exception the target lets through is a crash; the allowed ones are caught by the
target itself.

Command lines (run from anywhere):
  python fuzz/fuzz_X.py [libFuzzer flags] [corpus dirs]   fuzz (atheris / fallback)
  python fuzz/fuzz_X.py --repro FILE...                   run inputs once, print outcome
  python fuzz/fuzz_X.py --minimize FILE [SECONDS]         shrink a crash, keep its signature
Environment:
  FUZZ_FALLBACK=1            use the built-in mutation loop even if atheris is installed
  FUZZ_IGNORE=path           a file of crash signatures (one a line) to treat as known:
                             run.py uses it to go on fuzzing after a first finding
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import random
import sys
import time
import traceback

FUZZ_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(FUZZ_DIR)
for _path in (os.path.join(REPO, "tests"), REPO):
    if _path not in sys.path:
        sys.path.insert(0, _path)

try:
    if os.environ.get("FUZZ_FALLBACK") == "1":
        raise ImportError("FUZZ_FALLBACK=1")
    import atheris
except ImportError:         # the fallback loop below takes its place
    atheris = None

ENGINE = "atheris" if atheris is not None else "fallback"


class Finding(AssertionError):
    """An invariant the target checks does not hold."""

    def __init__(self, label: str, detail: str = ""):
        super().__init__(f"{label}: {detail}" if detail else label)
        self.label = label


def fail(label: str, detail: str = "") -> None:
    raise Finding(label, detail)


def split_stream(data: bytes) -> tuple[bytes, list[bytes]]:
    """data[0] % 64 chunk sizes (each byte + 1), then the stream: the stream, and the
    chunks it arrives in (whatever the sizes leave over is the last one)."""
    k = data[0] % 64
    sizes, stream = data[1:1 + k], data[1 + k:]
    chunks, i = [], 0
    for s in sizes:
        if i >= len(stream):
            break
        chunks.append(stream[i:i + s + 1])
        i += s + 1
    if i < len(stream):
        chunks.append(stream[i:])
    return stream, chunks


def instrumented():
    """Context manager under which a target imports the code it fuzzes."""
    if atheris is None:
        return contextlib.nullcontext()
    return atheris.instrument_imports(include=["pgfast", "wire_reference", "scramp"])


def signature(exc: BaseException) -> str:
    """What makes two crashes the same: a Finding's label, else the exception type and
    the innermost frame inside pgfast (or scramp, or wherever it was raised)."""
    if isinstance(exc, Finding):
        return "finding:" + exc.label
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if f"{os.sep}pgfast{os.sep}" in f.filename or f"{os.sep}scramp{os.sep}" in f.filename]
    where = (ours or frames or [None])[-1]
    if where is None:
        return type(exc).__name__
    return f"{type(exc).__name__}@{os.path.basename(where.filename)}:{where.name}:{where.lineno}"


class Reader:
    """Structured values out of fuzzer bytes; never fails, yields zeros once exhausted."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        return self.byte() << 8 | self.byte()

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def chunk(self) -> bytes:
        """A u16 length, then that many bytes (fewer at the end of the input)."""
        return self.take(self.u16())

    def rest(self) -> bytes:
        return self.take(self.remaining())

    def pick(self, options):
        return options[self.byte() % len(options)]


def _load_ignored() -> set[str]:
    path = os.environ.get("FUZZ_IGNORE")
    if not path or not os.path.exists(path):
        return set()
    with open(path) as f:
        return {line.strip() for line in f if line.strip()}


def _guarded(test, ignored: set[str]):
    def one_input(data: bytes) -> None:
        try:
            test(data)
        except Exception as exc:
            sig = signature(exc)
            if sig in ignored:
                return
            literal = repr(data) if len(data) <= 4096 else repr(data[:4096]) + " (truncated)"
            sys.stderr.write(f"\nFUZZ-SIGNATURE: {sig}\nFUZZ-INPUT: {literal}\n")
            sys.stderr.flush()
            raise
    return one_input


def _outcome(test, data: bytes) -> tuple[str | None, str]:
    """(signature or None, traceback text) of one run."""
    try:
        test(data)
    except Exception as exc:
        return signature(exc), "".join(traceback.format_exception(exc))
    return None, ""


def _repro(test, files: list[str]) -> int:
    status = 0
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        sig, tb = _outcome(test, data)
        print(f"== {path} ({len(data)} bytes)")
        print(f"input: {data!r}")
        if sig is None:
            print("outcome: no failure")
        else:
            status = 1
            print(f"signature: {sig}")
            print(tb, end="")
    return status


def _minimize(test, path: str, seconds: float) -> int:
    """Greedy delta debugging: drop chunks, then simplify bytes, while the signature stays."""
    with open(path, "rb") as f:
        data = f.read()
    want, _ = _outcome(test, data)
    if want is None:
        print(f"{path}: does not fail, nothing to minimize")
        return 0
    deadline = time.monotonic() + seconds
    best = data
    chunk = max(1, len(best) // 2)
    while chunk >= 1 and time.monotonic() < deadline:
        i, shrunk = 0, False
        while i < len(best) and time.monotonic() < deadline:
            cand = best[:i] + best[i + chunk:]
            if _outcome(test, cand)[0] == want:
                best, shrunk = cand, True
            else:
                i += chunk
        if not shrunk:
            chunk //= 2
    for i in range(len(best)):          # prefer printable, small bytes
        if time.monotonic() >= deadline:
            break
        for b in (0x00, 0x61, 0x30):
            if best[i] == b:
                break
            cand = best[:i] + bytes([b]) + best[i + 1:]
            if _outcome(test, cand)[0] == want:
                best = cand
                break
    sig, tb = _outcome(test, best)
    out = path + ".min"
    with open(out, "wb") as f:
        f.write(best)
    print(f"signature: {sig}")
    print(f"minimized: {out} ({len(data)} -> {len(best)} bytes)")
    print(f"input: {best!r}")
    print(tb, end="")
    return 1


# --- the fallback engine: seeded mutations, no coverage feedback -----------------------------

_INTERESTING = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\x00\x00\x00\x00", b"\xff\xff\xff\xff",
                b"\x00\x00\x00\x08", b"\x00\x00\x00\x04", b"\x00\x00\x27\x14", b"\x04\xd2\x16\x2f",
                b"\x00\x03\x00\x00", b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00", b",", b"=", b"\xc3\xa9"]


def _mutate(rng: random.Random, data: bytes, pool: list[bytes], max_len: int) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        pos = rng.randint(0, len(buf))
        if op == 0 and buf:                                   # flip a bit
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:                                 # set a byte
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == 2:                                         # insert random bytes
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and buf:                                 # delete a run
            del buf[pos:pos + rng.randint(1, 16)]
        elif op == 4:                                         # an interesting value
            v = rng.choice(_INTERESTING)
            if rng.random() < 0.5:
                buf[pos:pos] = v
            else:
                buf[pos:pos + len(v)] = v
        elif op == 5 and buf:                                 # duplicate a run
            a = rng.randrange(len(buf))
            buf[pos:pos] = buf[a:a + rng.randint(1, 32)]
        elif op == 6 and pool:                                # splice another input
            other = rng.choice(pool)
            a = rng.randint(0, len(other))
            buf[pos:] = other[a:]
        elif op == 7 and buf:                                 # add to a byte
            i = rng.randrange(len(buf))
            buf[i] = (buf[i] + rng.randint(-16, 16)) & 0xFF
    return bytes(buf[:max_len])


def _fallback(test, argv: list[str]) -> None:
    opts, paths = {}, []
    for arg in argv[1:]:
        if arg.startswith("-") and "=" in arg:
            key, value = arg[1:].split("=", 1)
            opts[key] = value
        else:
            paths.append(arg)
    files = [p for p in paths if os.path.isfile(p)]
    if files:
        sys.exit(_repro(test, files))
    seed = int(opts.get("seed", "0")) or int(time.time() * 1000) % (1 << 31)
    rng = random.Random(seed)
    max_len = int(opts.get("max_len", "4096"))
    total = float(opts.get("max_total_time", "0"))
    runs = int(opts.get("runs", "-1"))
    prefix = opts.get("artifact_prefix", "./")
    pool = []
    for d in paths:
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else ():
            with open(os.path.join(d, name), "rb") as f:
                pool.append(f.read()[:max_len])
    print(f"INFO: fallback mutation loop (atheris not in use), Seed: {seed}", file=sys.stderr)
    print(f"INFO: loaded {len(pool)} corpus inputs", file=sys.stderr)
    seeds, pool = list(pool), pool or [b""]
    start, n = time.monotonic(), 0

    def stats(kind: str) -> None:
        elapsed = max(time.monotonic() - start, 1e-9)
        print(f"#{n}\t{kind}   corp: {len(pool)} exec/s: {int(n / elapsed)}", file=sys.stderr)

    while (runs < 0 or n < runs) and (total <= 0 or time.monotonic() - start < total):
        data = seeds.pop(0) if seeds else _mutate(rng, rng.choice(pool), pool, max_len)
        n += 1
        try:
            test(data)
        except Exception:
            traceback.print_exc()
            os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
            path = f"{prefix}crash-{hashlib.sha1(data).hexdigest()}"
            with open(path, "wb") as f:
                f.write(data)
            print(f"==ERROR: fallback fuzzer: uncaught exception\nTest unit written to {path}", file=sys.stderr)
            print(f"stat::number_executed_units: {n}", file=sys.stderr)
            sys.exit(1)
        if rng.random() < 1 / 32 and len(pool) < 10000:
            pool.append(data)
        if n & (n - 1) == 0:
            stats("pulse")
    stats("DONE")
    print(f"Done {n} runs in {int(time.monotonic() - start)} second(s)", file=sys.stderr)
    print(f"stat::number_executed_units: {n}", file=sys.stderr)


def _instrument_target(module) -> None:
    """The target's own checks give coverage too: a seed that reaches a branch of the
    harness (a sub-target, a kind of credentials) is then worth keeping."""
    import types
    for value in list(vars(module).values()):
        if isinstance(value, types.FunctionType) and value.__module__ == module.__name__:
            atheris.instrument_func(value)
        elif isinstance(value, type) and value.__module__ == module.__name__:
            for attr in vars(value).values():
                if isinstance(attr, types.FunctionType):
                    atheris.instrument_func(attr)


def main(test) -> None:
    argv = sys.argv
    if len(argv) > 1 and argv[1] == "--repro":
        sys.exit(_repro(test, argv[2:]))
    if len(argv) > 1 and argv[1] == "--minimize":
        sys.exit(_minimize(test, argv[2], float(argv[3]) if len(argv) > 3 else 30.0))
    guarded = _guarded(test, _load_ignored())
    if atheris is None:
        _fallback(guarded, argv)
        return
    _instrument_target(sys.modules[test.__module__])
    atheris.Setup(argv, guarded)
    atheris.Fuzz()
