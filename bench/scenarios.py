"""The scenarios: the same client commands against every arm (only PGPORT differs).

Each measurement reads server-side CPU (procs.tree_cpu over the arm's process trees) and
the whole machine's CPU (/proc/stat) just before the client starts and just after it exits
and the server side has settled, and collects whatever the arm's logs said meanwhile.
"""
from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import asdict, dataclass, field

from . import procs
from .arms import SUSPICIOUS, Arm
from .cluster import BULK_QUERY, BULK_ROWS, BULK_TABLE, BULK_WIDTH, BenchError, Cluster

SCENARIO_KEYS = ("a", "b", "c", "d", "e")


@dataclass
class Measurement:
    scenario: str
    arm: str
    round: int
    value: float | None = None          # tps or MB/s
    unit: str = ""
    wall: float = 0.0                   # seconds, spawn to exit of the client
    work: float = 0.0                   # transactions, or bytes for bulk
    server_cpu: float = 0.0             # seconds: the arm's process trees (procs.tree_cpu)
    client_cpu: float = 0.0             # seconds: pgbench / psql (rusage)
    machine_busy: float = 0.0           # seconds of all cores busy, /proc/stat
    other_cpu: float = 0.0              # machine_busy - server_cpu - client_cpu: noise from elsewhere
    cpu_per_unit: float | None = None   # server CPU s per 1,000 transactions or per GB
    failed: int = 0                     # failed transactions (pgbench) or 1 for a failed bulk run
    ok: bool = True
    errors: list[str] = field(default_factory=list)
    log_lines: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Scenario:
    key: str
    title: str
    unit: str
    per: str                            # "1k tx" or "GB"
    pgbench_args: list[str] | None = None

    def command(self, cluster: Cluster, duration: int) -> list[str]:
        if self.pgbench_args is not None:
            return [cluster.bin("pgbench"), *self.pgbench_args, "-T", str(duration)]
        if self.key == "d":
            return [cluster.bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c",
                    f"COPY ({BULK_QUERY}) TO STDOUT"]
        return [cluster.bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", f"COPY {BULK_TABLE} FROM STDIN"]

    def shown(self, duration: int | str = "D") -> str:
        """The command as the README and the table show it."""
        if self.pgbench_args is not None:
            return "pgbench " + " ".join(self.pgbench_args) + f" -T {duration}"
        if self.key == "d":
            return f"psql -c \"COPY ({BULK_QUERY}) TO STDOUT\" > file"
        return f"psql -c \"COPY {BULK_TABLE} FROM STDIN\" < file"


SCENARIOS = {
    "a": Scenario("a", "a. churn: new TLS connection per select", "tps", "1k tx", ["-n", "-C", "-S", "-c", "4", "-j", "2"]),
    "b": Scenario("b", "b. select-only, persistent", "tps", "1k tx", ["-n", "-S", "-c", "8", "-j", "2"]),
    "c": Scenario("c", "c. TPC-B-like, persistent", "tps", "1k tx", ["-n", "-c", "8", "-j", "2"]),
    "d": Scenario("d", "d. bulk out: COPY TO STDOUT, 200 MB", "MB/s", "GB"),
    "e": Scenario("e", "e. bulk in: COPY FROM STDIN, 200 MB", "MB/s", "GB"),
}


def _tree_size(roots: list[int]) -> int:
    table = procs.process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    seen, stack = set(), [r for r in roots if r in table]
    while stack:
        pid = stack.pop()
        if pid not in seen:
            seen.add(pid)
            stack.extend(children.get(pid, ()))
    return len(seen)


class Meter:
    """CPU and log readings around one client run."""

    def __init__(self, arm: Arm):
        self.arm = arm

    def __enter__(self) -> "Meter":
        self.roots = self.arm.cpu_roots()
        self.logs = [(s, s.log_size()) for s in self.arm.logs()]
        self.tree_size = _tree_size(self.roots)
        self.busy0, _ = procs.machine_cpu()
        self.cpu0 = procs.tree_cpu(self.roots)
        return self

    def __exit__(self, *exc) -> None:
        # let backends of closed connections exit (their CPU then moves into the postmaster's cutime)
        deadline = time.monotonic() + 1.0
        while _tree_size(self.roots) > self.tree_size and time.monotonic() < deadline:
            time.sleep(0.02)
        self.server_cpu = procs.tree_cpu(self.roots) - self.cpu0
        self.busy = procs.machine_cpu()[0] - self.busy0
        self.log_lines = []
        for server, offset in self.logs:
            for line in server.log_text(offset).splitlines():
                if SUSPICIOUS.search(line):
                    self.log_lines.append(f"{server.name}: {line}")


def _pgbench_number(pattern: str, text: str) -> float | None:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else None


def run_pgbench(scenario: Scenario, arm: Arm, duration: int, round_no: int) -> Measurement:
    cluster = arm.cluster
    m = Measurement(scenario.key, arm.name, round_no, unit=scenario.unit)
    env = cluster.client_env(arm.port)
    with Meter(arm) as meter:
        result = procs.run_client(scenario.command(cluster, duration), env, timeout=duration + 120)
    out = result.stdout.decode(errors="replace")
    err = result.stderr.decode(errors="replace")
    tps = _pgbench_number(r"\ntps = ([0-9.]+)", out)
    processed = _pgbench_number(r"number of transactions actually processed: (\d+)", out)
    failed = _pgbench_number(r"number of failed transactions: (\d+)", out)
    m.value, m.work, m.failed = tps, processed or 0, int(failed or 0)
    m.details = {"pgbench_stdout": out.strip().splitlines()[-12:],
                 "latency_ms": _pgbench_number(r"latency average = ([0-9.]+) ms", out),
                 "connection_time_ms": _pgbench_number(r"(?:average|initial) connection time = ([0-9.]+) ms", out)}
    if result.returncode != 0 or tps is None or m.failed:
        m.ok = False
        m.errors.append(f"pgbench exited {result.returncode}, failed transactions {m.failed}: "
                        + " | ".join(err.strip().splitlines()[-6:]))
    elif err.strip():
        m.errors.append("pgbench stderr: " + " | ".join(err.strip().splitlines()[-6:]))
    _finish(m, meter, result, per=1000.0)
    return m


def _md5_file(path: str) -> tuple[str, int]:
    digest = hashlib.md5()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def run_bulk_out(scenario: Scenario, arm: Arm, round_no: int) -> Measurement:
    cluster = arm.cluster
    m = Measurement(scenario.key, arm.name, round_no, unit=scenario.unit)
    env = cluster.client_env(arm.port)
    with open(cluster.bulk_out_file, "wb") as out, Meter(arm) as meter:
        result = procs.run_client(scenario.command(cluster, 0), env, stdout=out, timeout=600)
    md5, size = _md5_file(cluster.bulk_out_file)        # outside the timed part
    os.unlink(cluster.bulk_out_file)
    m.work = size
    m.value = size / 1e6 / result.elapsed
    m.details = {"bytes": size, "md5": md5, "expected_md5": cluster.bulk_md5}
    if result.returncode != 0:
        m.ok = False
        m.errors.append(f"psql exited {result.returncode}: {result.stderr.decode(errors='replace').strip()[-500:]}")
    if md5 != cluster.bulk_md5 or size != cluster.bulk_bytes:
        m.ok = False
        m.errors.append(f"checksum mismatch: received {size} bytes md5 {md5}, "
                        f"expected {cluster.bulk_bytes} bytes md5 {cluster.bulk_md5}")
    if not m.ok:
        m.failed = 1
    _finish(m, meter, result, per=1e9)
    return m


def run_bulk_in(scenario: Scenario, arm: Arm, round_no: int) -> Measurement:
    cluster = arm.cluster
    m = Measurement(scenario.key, arm.name, round_no, unit=scenario.unit)
    env = cluster.client_env(arm.port)
    cluster.psql(f"TRUNCATE {BULK_TABLE}", env)
    with open(cluster.bulk_in_file, "rb") as data, Meter(arm) as meter:
        result = procs.run_client(scenario.command(cluster, 0), env, stdin=data, timeout=600)
    m.work = cluster.bulk_bytes
    m.value = cluster.bulk_bytes / 1e6 / result.elapsed
    if result.returncode != 0:
        m.ok = False
        m.errors.append(f"psql exited {result.returncode}: {result.stderr.decode(errors='replace').strip()[-500:]}")
    # checked inside the database, outside the timed part
    check = cluster.psql(f"SELECT count(*) || ' ' || coalesce(md5(string_agg(v || E'\\n', '')), '') "
                         f"FROM {BULK_TABLE}", env)
    rows, _, md5 = check.partition(" ")
    m.details = {"rows": int(rows), "md5": md5, "expected_md5": cluster.bulk_md5}
    if int(rows) != BULK_ROWS or md5 != cluster.bulk_md5:
        m.ok = False
        m.errors.append(f"checksum mismatch in the table: {rows} rows md5 {md5}, "
                        f"expected {BULK_ROWS} rows md5 {cluster.bulk_md5}")
    if not m.ok:
        m.failed = 1
    cluster.psql(f"TRUNCATE {BULK_TABLE}", env)
    _finish(m, meter, result, per=1e9)
    return m


def _finish(m: Measurement, meter: Meter, result: procs.ClientResult, per: float) -> None:
    m.wall = result.elapsed
    m.server_cpu = meter.server_cpu
    m.client_cpu = result.cpu
    m.machine_busy = meter.busy
    m.other_cpu = meter.busy - meter.server_cpu - result.cpu
    m.log_lines = meter.log_lines[:50]
    if m.work:
        m.cpu_per_unit = m.server_cpu / (m.work / per)


def run(scenario: Scenario, arm: Arm, duration: int, round_no: int) -> Measurement:
    if scenario.pgbench_args is not None:
        return run_pgbench(scenario, arm, duration, round_no)
    if scenario.key == "d":
        return run_bulk_out(scenario, arm, round_no)
    return run_bulk_in(scenario, arm, round_no)


# ------------------------------------------------------------------ outside the timed part

PGBENCH_TABLES = "pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history"


def housekeeping(arm: Arm) -> None:
    """Before an arm's block: the same state for every arm (vacuumed, checkpointed, cached)."""
    cluster = arm.cluster
    env = cluster.client_env(arm.port)
    cluster.psql(f"VACUUM {PGBENCH_TABLES}", env)
    cluster.psql("CHECKPOINT", env)
    try:
        cluster.psql("SELECT sum(pg_prewarm(c.oid)) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                     "WHERE n.nspname = 'public' AND c.relname LIKE 'pgbench%' AND c.relkind IN ('r', 'i')", env)
    except BenchError:
        cluster.psql("SELECT count(*) FROM pgbench_accounts", env)


def warm_up(arm: Arm, seconds: int) -> None:
    """Untimed: a select-only pgbench run, and a bulk run of a tenth of the size each way."""
    cluster = arm.cluster
    env = cluster.client_env(arm.port)
    if seconds > 0:
        result = procs.run_client([cluster.bin("pgbench"), "-n", "-S", "-c", "8", "-j", "2", "-T", str(seconds)],
                                  env, timeout=seconds + 120)
        if result.returncode != 0:
            raise BenchError(f"warm-up pgbench failed on {arm.name}: {result.stderr.decode(errors='replace')[-1000:]}")
    small = BULK_ROWS // 10
    with open(os.devnull, "wb") as sink:
        procs.run_client([cluster.bin("psql"), "-X", "-q", "-c",
                          f"COPY (SELECT repeat('x', {BULK_WIDTH}) FROM generate_series(1, {small})) TO STDOUT"],
                         env, stdout=sink, timeout=300)


def scenario_warm_up(scenario: Scenario, arm: Arm, seconds: int) -> None:
    """Untimed, before each pgbench scenario in full runs: the same command for a few seconds."""
    if scenario.pgbench_args is None or seconds <= 0:
        return
    procs.run_client(scenario.command(arm.cluster, seconds), arm.cluster.client_env(arm.port),
                     timeout=seconds + 120)
