"""Run the fuzz targets, each in its own subprocess, and report.

    python fuzz/run.py --seconds N [--jobs J] [--no-minimize] [target ...]

Targets: startup, framing, scanner, auth, upstream (all by default). Each runs for N seconds of
wall time with atheris (libFuzzer) on fuzz/corpus/<target>/ (the committed seeds) and
fuzz/artifacts/<target>/corpus/ (what it finds, kept between runs). A crash stops
libFuzzer; the runner records it (artifact, signature, traceback) and starts the
target again for the time left, telling the harness to treat the signatures already
found as known (FUZZ_IGNORE), so one run can report several distinct findings. Each
crash is then shrunk (--minimize, at most 20 s) and described in <artifact>.txt.

Per target it prints the inputs run (libFuzzer's final stats), the crashes found and
their artifacts. Exit status: 1 if any target crashed, 2 if a target could not run.
Everything lands under fuzz/artifacts/, which is git-ignored.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time

FUZZ_DIR = os.path.dirname(os.path.abspath(__file__))
ARTIFACTS = os.path.join(FUZZ_DIR, "artifacts")
# target: the largest input worth generating (libFuzzer's -max_len)
TARGETS = {"startup": 11000, "framing": 8192, "scanner": 8192, "auth": 4096, "upstream": 4096}
TIMEOUT = 25            # seconds for one input before libFuzzer calls it a hang
MINIMIZE_SECONDS = 20


def _units(log: str) -> int:
    m = re.findall(r"stat::number_(?:of_)?executed_units:\s*(\d+)", log)
    if m:
        return int(m[-1])
    m = re.findall(r"^#(\d+)\s", log, re.MULTILINE)
    return int(m[-1]) if m else 0


def _traceback(log: str) -> str:
    """The Python traceback atheris (or the fallback loop) printed for the crash."""
    start = log.find("=== Uncaught Python exception: ===")
    if start < 0:
        start = log.rfind("Traceback (most recent call last)")
    if start < 0:
        return ""
    end = min((i for i in (log.find("\n==", start + 1), log.find("FUZZ-SIGNATURE", start)) if i > 0),
              default=len(log))
    return log[start:end].rstrip() + "\n"


class Result:
    def __init__(self, name: str):
        self.name = name
        self.units = 0
        self.crashes: list[dict] = []
        self.error: str | None = None
        self.attempts = 0


def run_target(name: str, seconds: float, minimize: bool, keep_known: bool = False) -> Result:
    result = Result(name)
    script = os.path.join(FUZZ_DIR, f"fuzz_{name}.py")
    out_dir = os.path.join(ARTIFACTS, name)
    work_corpus = os.path.join(out_dir, "corpus")
    os.makedirs(work_corpus, exist_ok=True)
    known = os.path.join(out_dir, "known-signatures.txt")
    if not keep_known or not os.path.exists(known):
        open(known, "w").close()
    env = dict(os.environ, FUZZ_IGNORE=known, PYTHONUNBUFFERED="1")
    deadline = time.monotonic() + seconds
    silent_repeats = 0
    while True:
        remaining = int(deadline - time.monotonic())
        if remaining < 3 and result.attempts:
            break
        remaining = max(remaining, 3)
        result.attempts += 1
        log_path = os.path.join(out_dir, f"log-{result.attempts}.txt")
        cmd = [sys.executable, script, f"-max_total_time={remaining}", "-print_final_stats=1",
               f"-max_len={TARGETS[name]}", f"-timeout={TIMEOUT}", "-rss_limit_mb=3072",
               f"-artifact_prefix={out_dir}{os.sep}", work_corpus, os.path.join(FUZZ_DIR, "corpus", name)]
        with open(log_path, "w") as log_file:
            try:
                proc = subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                      timeout=remaining + TIMEOUT + 120)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = None
        with open(log_path, errors="replace") as f:
            log = f.read()
        result.units += _units(log)
        artifacts = re.findall(r"Test unit written to (\S+)", log)
        if rc is None:
            result.error = f"did not stop in time (see {log_path})"
            break
        if not artifacts:
            if rc != 0:
                result.error = f"exited with status {rc} and no artifact (see {log_path})"
            break
        sig = (re.findall(r"^FUZZ-SIGNATURE: (.*)$", log, re.MULTILINE) or [None])[-1]
        literal = (re.findall(r"^FUZZ-INPUT: (.*)$", log, re.MULTILINE) or [None])[-1]
        kind = os.path.basename(artifacts[-1]).split("-")[0]      # crash, timeout, oom, leak
        crash = {"artifact": artifacts[-1], "signature": sig or kind, "input": literal,
                 "traceback": _traceback(log), "log": log_path}
        result.crashes.append(crash)
        if sig:
            with open(known, "a") as f:
                f.write(sig + "\n")
        else:
            silent_repeats += 1         # a hang or OOM cannot be told apart by signature
            if silent_repeats >= 3:
                break
    for crash in result.crashes:
        describe(script, crash, minimize)
    return result


def describe(script: str, crash: dict, minimize: bool) -> None:
    """<artifact>.txt: signature, input, traceback (of the minimized input when there is one)."""
    artifact = crash["artifact"]
    if not os.path.exists(artifact):
        return
    parts = [f"signature: {crash['signature']}", f"artifact: {artifact}", f"log: {crash['log']}",
             f"input: {crash['input']}", "", crash["traceback"]]
    if minimize and crash["signature"].split(":")[0] not in ("timeout", "oom", "leak"):
        try:
            proc = subprocess.run([sys.executable, script, "--minimize", artifact, str(MINIMIZE_SECONDS)],
                                  capture_output=True, text=True, timeout=MINIMIZE_SECONDS + 60)
            out = proc.stdout
            parts += ["--- minimized ---", out]
            m = re.search(r"^minimized: (\S+)", out, re.MULTILINE)
            crash["minimized"] = m.group(1) if m else None
        except subprocess.TimeoutExpired:
            parts.append("--- minimizing timed out ---")
    with open(artifact + ".txt", "w") as f:
        f.write("\n".join(parts))
    crash["report"] = artifact + ".txt"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="wall time per target (default 60)")
    parser.add_argument("--jobs", type=int, default=1, help="targets run at once (default 1)")
    parser.add_argument("--keep-known", action="store_true",
                        help="treat the signatures earlier runs found (artifacts/<target>/known-signatures.txt) "
                             "as known from the start, to look for new ones")
    parser.add_argument("--no-minimize", action="store_true", help="do not shrink crash inputs")
    parser.add_argument("targets", nargs="*", help=f"any of {', '.join(TARGETS)} (default all)")
    args = parser.parse_args()
    names = args.targets or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    results: dict[str, Result] = {}
    lock = threading.Lock()
    queue = list(names)

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                name = queue.pop(0)
            print(f"[{name}] fuzzing for {args.seconds:.0f} s ...", flush=True)
            results[name] = run_target(name, args.seconds, not args.no_minimize, args.keep_known)
            print(f"[{name}] done", flush=True)

    threads = [threading.Thread(target=worker) for _ in range(max(1, min(args.jobs, len(names))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    status = 0
    print()
    for name in names:
        r = results[name]
        print(f"== {name}: {r.units} inputs run in {r.attempts} run(s), {len(r.crashes)} crash(es)")
        if r.error:
            print(f"   ERROR: {r.error}")
            status = max(status, 2)
        for c in r.crashes:
            status = max(status, 1)
            print(f"   - {c['signature']}")
            print(f"     artifact: {c['artifact']}")
            if c.get("minimized"):
                print(f"     minimized: {c['minimized']}")
            if c.get("report"):
                print(f"     report: {c['report']}")
    return status


if __name__ == "__main__":
    sys.exit(main())
