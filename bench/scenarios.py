"""The scenarios: the same client commands against every arm (only PGPORT differs).

Each measurement reads server-side CPU (procs.tree_cpu over the arm's process trees), the front
door's own CPU (procs.own_cpu of the arm's front_pids: pgfast's processes, or pgbouncer) and the
whole machine's CPU (/proc/stat) just before the client starts and just after it exits and the
server side has settled, and collects whatever the arm's logs said meanwhile.

SCENARIO_ARMS says which scenario runs on which arm; the others are not run ("–" in the tables).
"""
from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import asdict, dataclass, field

from . import procs
from .arms import ARM_NAMES, SUSPICIOUS, Arm
from .cluster import BULK_QUERY, BULK_ROWS, BULK_TABLE, BULK_WIDTH, BenchError, Cluster

SCENARIO_KEYS = ("a", "b", "c", "d", "e", "f", "g")


@dataclass
class Measurement:
    scenario: str
    arm: str
    round: int
    value: float | None = None          # tps or MB/s
    unit: str = ""
    wall: float = 0.0                   # seconds, spawn to exit of the client
    window: float = 0.0                 # seconds between the CPU readings (f, g: from "all connected")
    work: float = 0.0                   # transactions, or bytes for bulk
    server_cpu: float = 0.0             # seconds: the arm's process trees (procs.tree_cpu)
    client_cpu: float = 0.0             # seconds: pgbench / psql (rusage)
    machine_busy: float = 0.0           # seconds of all cores busy, /proc/stat
    other_cpu: float = 0.0              # machine_busy - server_cpu - client_cpu: noise from elsewhere
    cpu_per_unit: float | None = None   # server CPU s per 1,000 transactions or per GB
    front_cpu: float | None = None      # seconds: the front door's own processes (None: stock, or lost)
    front_cpu_per_unit: float | None = None     # front CPU s per 1,000 transactions or per GB
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
    # many clients: pgbench's -T clock includes its initial connection phase (PostgreSQL 15), which
    # takes seconds for hundreds of TLS clients; -T gets this many seconds more, and the CPU readings
    # start once every client is connected (Meter.wait_connected)
    connect_allowance: int = 0

    @property
    def clients(self) -> int:
        args = self.pgbench_args or []
        return int(args[args.index("-c") + 1]) if "-c" in args else 1

    @property
    def connect_first(self) -> bool:
        return self.connect_allowance > 0

    def command(self, cluster: Cluster, duration: int) -> list[str]:
        if self.pgbench_args is not None:
            return [cluster.bin("pgbench"), *self.pgbench_args, "-T", str(duration + self.connect_allowance)]
        if self.key == "d":
            return [cluster.bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c",
                    f"COPY ({BULK_QUERY}) TO STDOUT"]
        return [cluster.bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", f"COPY {BULK_TABLE} FROM STDIN"]

    def shown(self, duration: int | str = "D") -> str:
        """The command as the README and the table show it."""
        if self.pgbench_args is not None:
            extra = f"+{self.connect_allowance}" if self.connect_allowance else ""
            return "pgbench " + " ".join(self.pgbench_args) + f" -T {duration}{extra}"
        if self.key == "d":
            return f"psql -c \"COPY ({BULK_QUERY}) TO STDOUT\" > file"
        return f"psql -c \"COPY {BULK_TABLE} FROM STDIN\" < file"


SCENARIOS = {
    "a": Scenario("a", "a. churn: new TLS connection per select", "tps", "1k tx", ["-n", "-C", "-S", "-c", "4", "-j", "2"]),
    "b": Scenario("b", "b. select-only, persistent", "tps", "1k tx", ["-n", "-S", "-c", "8", "-j", "2"]),
    "c": Scenario("c", "c. TPC-B-like, persistent", "tps", "1k tx", ["-n", "-c", "8", "-j", "2"]),
    "d": Scenario("d", "d. bulk out: COPY TO STDOUT, 200 MB", "MB/s", "GB"),
    "e": Scenario("e", "e. bulk in: COPY FROM STDIN, 200 MB", "MB/s", "GB"),
    "f": Scenario("f", "f. many clients: 500, select-only, prepared", "tps", "1k tx",
                  ["-n", "-S", "-c", "500", "-j", "2", "-M", "prepared"], connect_allowance=10),
    "g": Scenario("g", "g. TPC-B-like, 100 clients, extended protocol", "tps", "1k tx",
                  ["-n", "-c", "100", "-j", "2", "-M", "extended"], connect_allowance=3),
}

# Which scenario runs on which arm. f and g are about transaction pooling: 500 (100) clients on 20
# backends; the session-pooling arms would need a backend per client, so only stock PostgreSQL (one
# backend per client, max_connections = 600) is there as the reference. pgfast-tx runs only f and g.
_TX_ARMS = ("stock", "pgfast-tx", "pgbouncer-transaction")
# the upstream arms: select-only, churn and bulk out (issue 11's figures)
_UPSTREAM_ARMS = ("pgfast-upstream", "pgbouncer-upstream")
_SESSION_ARMS = tuple(a for a in ARM_NAMES if a not in ("pgfast-tx", "pgfast-metrics") + _UPSTREAM_ARMS)
# metrics' cost: where a login (a) or a query (b) is the unit, against the same pgfast without them
_METRICS_ARMS = _SESSION_ARMS + ("pgfast-metrics",)
SCENARIO_ARMS: dict[str, tuple[str, ...]] = {
    "a": _METRICS_ARMS + _UPSTREAM_ARMS,
    "b": _METRICS_ARMS + _UPSTREAM_ARMS,
    "c": _SESSION_ARMS,
    "d": _SESSION_ARMS + _UPSTREAM_ARMS,
    "e": _SESSION_ARMS,
    "f": _TX_ARMS,
    "g": _TX_ARMS,
}
assert set(SCENARIO_ARMS) == set(SCENARIO_KEYS) and all(set(v) <= set(ARM_NAMES) for v in SCENARIO_ARMS.values())


def runs_on(scenario: str, arm: str) -> bool:
    return arm in SCENARIO_ARMS[scenario]


def _tree_size(roots: list[int]) -> int:
    return len(procs.tree_pids(roots))


def settle_tree(roots: list[int], quiet: float = 0.1, timeout: float = 2.0) -> int:
    """Until the trees have not changed size for `quiet` seconds (e.g. the backend of a set-up psql
    that has just disconnected is gone), at most timeout; returns the size."""
    deadline = time.monotonic() + timeout
    size, since = _tree_size(roots), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet:
        time.sleep(0.01)
        now = _tree_size(roots)
        if now != size:
            size, since = now, time.monotonic()
    return size


class Meter:
    """CPU and log readings around one client run.

    Normally the readings bracket the whole client run (`with Meter(arm) as meter:` around it). For
    the many-client scenarios (Scenario.connect_first) the start readings are taken instead once every
    client has connected (wait_connected, called by run_client right after the spawn): pgbench opens
    all its connections before its first transaction, and its tps leaves that phase out, so the CPU
    per transaction does too (the end readings still include the disconnections)."""

    def __init__(self, arm: Arm, settle: float = 1.0):
        self.arm = arm
        self.settle = settle
        self.roots = arm.cpu_roots()
        self.front = arm.front_pids()
        self.logs = [(s, s.log_size()) for s in arm.logs()]
        self.tree_size = settle_tree(self.roots)     # at rest, before the client starts
        self.client_cpu_at_start = 0.0
        self.connected: dict | None = None

    def begin(self) -> None:
        self.t0 = time.perf_counter()
        self.busy0, _ = procs.machine_cpu()
        self.front0 = procs.own_cpu(self.front)
        self.cpu0 = procs.tree_cpu(self.roots)

    def wait_connected(self, process, port: int, clients: int, timeout: float) -> None:
        """Until `clients` TCP connections to port are established (pgbench connects one client after
        the other in each thread, so by then all but the last have finished TLS and start-up), the
        client exits, or timeout; then the start readings."""
        spawned = time.perf_counter()
        deadline = spawned + timeout
        count = 0
        while process.poll() is None and time.perf_counter() < deadline:
            count = procs.established(port)
            if count >= clients:
                break
            time.sleep(0.01)
        ticks = procs.own_cpu([process.pid]).get(process.pid)
        self.begin()
        self.client_cpu_at_start = (ticks or 0) / procs.CLK_TCK
        self.connected = {"clients": clients, "established": count, "after_s": round(self.t0 - spawned, 3),
                          "complete": count >= clients, "client_cpu_connecting_s": self.client_cpu_at_start}

    def __enter__(self) -> "Meter":
        self.begin()
        return self

    def __exit__(self, *exc) -> None:
        self.finish()

    def finish(self) -> None:
        # let backends of closed connections exit (their CPU then moves into the postmaster's cutime)
        # (with the longer settle of the many-client scenarios: until the tree is back to its size at
        # rest, or stopped shrinking for 0.3 s, as when a pool keeps backends it opened)
        now = time.monotonic()
        deadline, last_change, last_size = now + self.settle, now, None
        while time.monotonic() < deadline:
            size = _tree_size(self.roots)
            if size <= self.tree_size:
                break
            if size != last_size:
                last_size, last_change = size, time.monotonic()
            elif self.settle > 1.0 and time.monotonic() - last_change >= 0.3:
                break
            time.sleep(0.02)
        self.server_cpu = procs.tree_cpu(self.roots) - self.cpu0
        front1 = procs.own_cpu(self.front)
        self.busy = procs.machine_cpu()[0] - self.busy0
        self.window = time.perf_counter() - self.t0
        # the front door's processes are long-lived: one that went (or a new one, e.g. a restarted
        # worker) makes the reading incomplete; it is then left out of the medians
        self.front_problems = []
        lost = [p for p in self.front if p not in self.front0 or p not in front1]
        if lost:
            self.front_problems.append(f"front-door process(es) {lost} disappeared during the measurement")
        if self.front:
            new = sorted(set(self.arm.front_pids()) - set(self.front))
            if new:
                self.front_problems.append(f"new front-door process(es) {new} appeared during the measurement "
                                           f"(a restarted worker?); their CPU is not counted")
        self.front_pids = list(self.front)
        if not self.front or self.front_problems:
            self.front_cpu = None
        else:
            self.front_cpu = sum(front1[p] - self.front0[p] for p in self.front) / procs.CLK_TCK
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
    command = scenario.command(cluster, duration)
    timeout = duration + scenario.connect_allowance + 120
    if scenario.connect_first:
        meter = Meter(arm, settle=5.0)
        result = procs.run_client(command, env, timeout=timeout, on_start=lambda p: meter.wait_connected(
            p, arm.port, scenario.clients, timeout=duration + scenario.connect_allowance + 60))
        meter.finish()
        m.details["connected"] = meter.connected
    else:
        with Meter(arm) as meter:
            result = procs.run_client(command, env, timeout=timeout)
    out = result.stdout.decode(errors="replace")
    err = result.stderr.decode(errors="replace")
    tps = _pgbench_number(r"\ntps = ([0-9.]+)", out)
    processed = _pgbench_number(r"number of transactions actually processed: (\d+)", out)
    failed = _pgbench_number(r"number of failed transactions: (\d+)", out)
    m.value, m.work, m.failed = tps, processed or 0, int(failed or 0)
    m.details.update({"pgbench_stdout": out.strip().splitlines()[-12:],
                      "latency_ms": _pgbench_number(r"latency average = ([0-9.]+) ms", out),
                      "connection_time_ms": _pgbench_number(r"(?:average|initial) connection time = ([0-9.]+) ms",
                                                            out),
                      "command": " ".join(command[1:])})
    if scenario.connect_first and meter.connected and not meter.connected["complete"]:
        m.errors.append(f"only {meter.connected['established']} of {scenario.clients} clients were connected "
                        f"when the CPU readings started ({meter.connected['after_s']} s after the spawn)")
    if result.returncode != 0 or tps is None or m.failed:
        m.ok = False
        m.errors.append(f"pgbench exited {result.returncode}, tps {tps}, transactions {int(processed or 0)}, "
                        f"failed transactions {m.failed}: "
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
    m.window = meter.window
    m.server_cpu = meter.server_cpu
    m.client_cpu = result.cpu - meter.client_cpu_at_start
    m.machine_busy = meter.busy
    m.other_cpu = meter.busy - meter.server_cpu - m.client_cpu
    m.log_lines = meter.log_lines[:50]
    m.front_cpu = meter.front_cpu
    m.details["front_pids"] = meter.front_pids
    m.errors.extend(meter.front_problems)       # an anomaly, not a failed measurement
    if m.work:
        m.cpu_per_unit = m.server_cpu / (m.work / per)
        if m.front_cpu is not None:
            m.front_cpu_per_unit = m.front_cpu / (m.work / per)


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
                     timeout=seconds + scenario.connect_allowance + 120)
