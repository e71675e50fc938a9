"""Processes the harness starts, their clean-up, and CPU time read from /proc.

Every server process is started through start_server() and recorded here by pid; stop_all()
(called from a finally block and on SIGINT/SIGTERM) stops each one that is still alive, in the
reverse order of starting, by its own pid only. Client programs (pgbench, psql) are run
through run_client(), which also kills its child when interrupted.
"""
from __future__ import annotations

import os
import pwd
import resource
import signal
import subprocess
import time
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")


def db_account() -> pwd.struct_passwd | None:
    """The account servers run as: `postgres` when the harness runs as root, else None (ourselves)."""
    if os.geteuid() == 0:
        return pwd.getpwnam("postgres")
    return None


def as_db_account() -> dict:
    account = db_account()
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def chown_db(path: str) -> None:
    account = db_account()
    if account is None:
        return
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            os.chown(root, account.pw_uid, account.pw_gid)
            for name in files:
                os.chown(os.path.join(root, name), account.pw_uid, account.pw_gid)
    else:
        os.chown(path, account.pw_uid, account.pw_gid)


# ------------------------------------------------------------------ servers and clean-up

@dataclass
class Server:
    name: str
    process: subprocess.Popen
    stop_signal: int
    log_path: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 60.0) -> int | None:
        """Send stop_signal and wait; SIGKILL after timeout. Returns the exit status."""
        if self.process.poll() is None:
            try:
                os.kill(self.process.pid, self.stop_signal)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"bench: {self.name} (pid {self.pid}) did not stop within {timeout:.0f} s; killing it",
                      flush=True)
                self.process.kill()
                self.process.wait()
        _SERVERS[:] = [s for s in _SERVERS if s is not self]
        return self.process.returncode

    def log_text(self, start: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(start)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_size(self) -> int:
        try:
            return os.path.getsize(self.log_path)
        except FileNotFoundError:
            return 0


_SERVERS: list[Server] = []


def start_server(name: str, argv: list[str], log_path: str, stop_signal: int, *, as_db: bool = True,
                 env: dict | None = None, cwd: str = "/") -> Server:
    """Start a long-running server in its own session (so a terminal's Ctrl-C reaches only the
    harness, which then stops the servers in order), stdout and stderr appended to log_path."""
    log = open(log_path, "ab")
    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, env=env, cwd=cwd,
                                   **(as_db_account() if as_db else {}))
    finally:
        log.close()
    server = Server(name, process, stop_signal, log_path)
    _SERVERS.append(server)
    return server


def stop_all() -> None:
    for server in list(reversed(_SERVERS)):
        try:
            server.stop(timeout=30)
        except Exception as exc:    # keep stopping the others
            print(f"bench: could not stop {server.name} (pid {server.pid}): {exc}", flush=True)


class Interrupted(Exception):
    pass


def install_signal_handlers() -> None:
    def handler(signum, frame):
        raise Interrupted(signal.Signals(signum).name)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)
    # Ctrl-C: KeyboardInterrupt, even when started with SIGINT ignored (a background job)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def raise_nofile(want: int = 65536) -> int:
    """Raise the soft limit on open files (inherited by every server and client started) towards want,
    within the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


# ------------------------------------------------------------------ clients

@dataclass
class ClientResult:
    returncode: int
    stdout: bytes
    stderr: bytes
    elapsed: float          # wall-clock seconds from spawn to exit
    cpu: float              # user + system seconds of the client process


def run_client(argv: list[str], env: dict, *, stdin=None, stdout=None,
               timeout: float | None = None, on_start=None) -> ClientResult:
    """Run a client program to completion, timing it and reading its CPU (wait4 rusage).

    stdout may be a file object (e.g. bulk output straight into a file); otherwise it is captured.
    on_start(process), when given, is called right after the spawn and before waiting for the
    exit (it may block for a while: e.g. until the client has made its connections).
    """
    cpu_before = children_cpu()
    start = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdin=stdin if stdin is not None else subprocess.DEVNULL,
                               stdout=stdout if stdout is not None else subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd="/")
    try:
        if on_start is not None:
            on_start(process)
        out, err = process.communicate(timeout=None if timeout is None else
                                       max(1.0, timeout - (time.perf_counter() - start)))
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        err = (err or b"") + f"\nbench: killed after {timeout:.0f} s (timeout)".encode()
    except BaseException:
        process.kill()
        process.communicate()
        raise
    elapsed = time.perf_counter() - start
    # the child was reaped by communicate(): its rusage is now in RUSAGE_CHILDREN
    return ClientResult(process.returncode, out or b"", err or b"", elapsed, children_cpu() - cpu_before)


def children_cpu() -> float:
    """user + system seconds of all reaped children of the harness so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------------ CPU from /proc

def _stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, utime+stime, cutime+cstime) in clock ticks, or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    fields = data[data.rindex(b")") + 2:].split()
    # fields[0] is field 3 (state); ppid is field 4, utime..cstime are fields 14..17
    ppid = int(fields[1])
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return ppid, utime + stime, cutime + cstime


def process_table() -> dict[int, tuple[int, int, int]]:
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None:
                table[int(entry)] = stat
    return table


def cmdline(pid: int) -> str:
    """The command line of pid, arguments joined by spaces ("" when it is gone or a zombie)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def own_cpu(pids: list[int]) -> dict[int, int]:
    """pid -> utime + stime in clock ticks, for exactly these processes (no children, nothing reaped);
    a pid that is gone is left out."""
    out = {}
    for pid in pids:
        stat = _stat(pid)
        if stat is not None:
            out[pid] = stat[1]
    return out


def tree_pids(roots: list[int], table: dict[int, tuple[int, int, int]] | None = None) -> list[int]:
    """The roots that exist and all their descendants (zombies included)."""
    table = process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    seen: set[int] = set()
    order: list[int] = []
    stack = [r for r in roots if r in table]
    while stack:
        pid = stack.pop()
        if pid not in seen:
            seen.add(pid)
            order.append(pid)
            stack.extend(children.get(pid, ()))
    return order


def tree_cpu(roots: list[int], attempts: int = 50) -> float:
    """CPU seconds of the process trees under roots, lifetime so far.

    For every live process in the trees (roots and all descendants, zombies included):
    utime + stime + cutime + cstime. A child that exited and was reaped has moved its whole
    lifetime CPU into its parent's cutime/cstime, so a backend that ended during a
    measurement still counts (through the postmaster), and the difference of two readings
    is the CPU spent in between by everything that was or became part of the trees.

    One scan of /proc is not atomic: a child reaped after its parent's stat was read and before its
    own was is counted nowhere. So after the scan the cutime+cstime of every process of the trees is
    read again, and the scan repeated while any of them changed (a reap happened meanwhile).
    """
    total = 0
    for _ in range(attempts):
        table = process_table()
        pids = tree_pids(roots, table)
        total = sum(table[p][1] + table[p][2] for p in pids)
        if all((_stat(p) or (0, 0, -1))[2] == table[p][2] for p in pids):
            break
        time.sleep(0.002)
    return total / CLK_TCK


def established(port: int) -> int:
    """TCP connections in state ESTABLISHED whose local port is port (the server's ends), IPv4 and IPv6."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    fields = line.split(None, 4)
                    if len(fields) > 3 and fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        count += 1
        except OSError:
            pass
    return count


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine from /proc/stat (all cores)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]        # idle + iowait
    total = sum(fields[:8])             # guest time is already inside user
    return (total - idle) / CLK_TCK, total / CLK_TCK


def busy_fraction(seconds: float = 1.0) -> float:
    """How busy the machine is now, 0..1 of all cores, over a short sample."""
    b0, t0 = machine_cpu()
    time.sleep(seconds)
    b1, t1 = machine_cpu()
    return (b1 - b0) / max(t1 - t0, 1e-9)


def other_busy_processes(exclude: set[int], min_share: float = 0.05, seconds: float = 1.0) -> list[str]:
    """Processes not started by us that used more than min_share of a core over a short sample."""
    before = process_table()
    time.sleep(seconds)
    after = process_table()
    busy = []
    for pid, (_, own, _) in after.items():
        if pid in exclude or pid == os.getpid():
            continue
        used = (own - before.get(pid, (0, own, 0))[1]) / CLK_TCK / seconds
        if used >= min_share:
            cmd = cmdline(pid) or "?"
            busy.append(f"pid {pid} {used:.0%} of a core: {cmd[:100]}")
    return busy
