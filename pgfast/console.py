"""The admin console: `psql "... dbname=pgfast"`, as PgBouncer's `dbname=pgbouncer`.

A client that logs in to the database `pgfast` (pg_hba.conf and authentication as for any
database) as a role named in pgfast.console_users gets every command, in
pgfast.stats_users the SHOW commands only; anyone else is refused. It speaks the simple
query protocol and answers itself, never through a backend:

    SHOW HELP | POOLS | CLIENTS | SERVERS | STATS | DATABASES | LISTS | CONFIG | TLS | WORKERS | UPSTREAM
       | VERSION
    RELOAD | PAUSE [db] | RESUME [db] | KILL db

Columns are named as PgBouncer's where the concept is the same, so its dashboards and
exporters read them. Every worker's clients and backends are shown: the worker a console
client landed on asks the others over a Unix socket each one listens on in PostgreSQL's
private socket directory (WorkerLink), and PAUSE, RESUME and KILL act on all of them.
"""
from __future__ import annotations

import asyncio
import json
import os
import time

from . import __version__, log, messages
from .config import PGFAST_SETTINGS
from .errors import ClientGone
from .reload import RESTART_PGFAST

DATABASE = "pgfast"
# what a console client is told of the server (PgBouncer, too, names itself in server_version)
PARAMETERS = {"server_version": f"{__version__}/pgfast", "server_encoding": "UTF8", "client_encoding": "UTF8",
              "DateStyle": "ISO", "integer_datetimes": "on", "standard_conforming_strings": "on",
              "application_name": ""}
ASK_TIMEOUT = 2.0           # a worker that does not answer within this is left out
_PAUSE_POLL = 0.05

HELP = """SHOW HELP|POOLS|CLIENTS|SERVERS|STATS|DATABASES|LISTS|CONFIG|TLS|WORKERS|UPSTREAM|VERSION
RELOAD
PAUSE [<db>]
RESUME [<db>]
KILL <db>"""


class CommandError(Exception):
    def __init__(self, sqlstate: str, message: str):
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


def role_of(pgfast_settings: dict, user: str) -> str | None:
    """'admin', 'stats' or None for a role logging in to the console."""
    if user in pgfast_settings["pgfast.console_users"]:
        return "admin"
    if user in pgfast_settings["pgfast.stats_users"]:
        return "stats"
    return None


# --- one worker's view (answered locally, or to another worker through the link) ----------

def _snapshot(frontend) -> dict:
    clients = [client.describe() for client in list(frontend.clients)]
    serving = {row.pop("backend"): row["ptr"] for row in clients if row.get("backend") is not None}
    servers = [backend.describe(link=serving.get(id(backend), ""))
               for backend in [*frontend.pool.backends(), *frontend.tx_pools.backends()]]
    for row in [*clients, *servers]:
        row.pop("backend", None)
        row["worker"] = frontend.worker
    stats = {db: list(values) for db, values in frontend.assignments.items()}
    for pool in frontend.tx_pools.pools():
        entry = stats.setdefault(pool.database, [0, 0])
        entry[0] += pool.assignments
        entry[1] += pool.wait_us
    upstream = frontend.upstream.describe() if frontend.upstream is not None else []
    return {"worker": frontend.worker, "pid": os.getpid(), "clients": clients, "servers": servers, "stats": stats,
            "paused": sorted(frontend.paused()), "upstream": upstream}


def answer_locally(frontend, command: str, args: list) -> dict:
    """What this worker says or does for a console command."""
    if command == "snapshot":
        return _snapshot(frontend)
    if command == "busy":
        return {"busy": frontend.busy_backends(args[0])}
    if command == "pause":
        frontend.pause(args[0])
    elif command == "resume":
        frontend.resume(args[0])
    elif command == "kill":
        return {"killed": frontend.kill(args[0])}
    return {}


class WorkerLink:
    """Each worker answers the others' console requests on its own Unix socket (a JSON line
    in, a JSON document out until the answering worker closes), so a console shows and acts
    on all of them."""

    def __init__(self, frontend, path_for, workers: int):
        self._frontend = frontend
        self._path_for = path_for          # worker -> its socket's path
        self._workers = workers
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        if self._workers < 2:
            return
        path = self._path_for(self._frontend.worker)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self._server = await asyncio.start_unix_server(self._answer, path=path)
        os.chmod(path, 0o600)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = json.loads(await reader.readline())
            reply = answer_locally(self._frontend, request["command"], request.get("args", []))
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except Exception as exc:        # the asking worker says the request did not reach this one
            log.log(f"pgfast: could not answer another worker's console request: {exc!r}")
        finally:
            writer.close()

    async def _ask(self, worker: int, command: str, args: list) -> dict:
        reader, writer = await asyncio.open_unix_connection(self._path_for(worker))
        try:
            writer.write(json.dumps({"command": command, "args": args}).encode() + b"\n")
            await writer.drain()
            # to the end, not a line: a snapshot of 10,000 clients is megabytes, past readline's limit
            return json.loads(await reader.read())
        finally:
            writer.close()

    async def everywhere(self, command: str, args: list = (), every: bool = False) -> list[dict]:
        """Every worker's answer, this one's first. A worker that cannot answer (restarting)
        is left out and logged, or, with every (a command that changes something), the
        console is told with CommandError."""
        args = list(args)
        answers = [answer_locally(self._frontend, command, args)]
        others = [w for w in range(self._workers) if w != self._frontend.worker]
        asked = await asyncio.gather(*(asyncio.wait_for(self._ask(w, command, args), ASK_TIMEOUT) for w in others),
                                     return_exceptions=True)
        missing = []
        for worker, reply in zip(others, asked):
            if isinstance(reply, (OSError, ValueError, asyncio.TimeoutError)):
                log.log(f"pgfast: worker {worker} did not answer a console request: {reply!r}")
                missing.append(worker)
            elif isinstance(reply, BaseException):
                raise reply
            else:
                answers.append(reply)
        if every and missing:
            raise CommandError("55000", f"{command.upper()} did not reach worker {', '.join(map(str, missing))}; "
                                        "run it again")
        return answers


# --- the result sets ------------------------------------------------------------------

_CLIENT_COLUMNS = ("type", "user", "database", "state", "addr", "port", "local_addr", "local_port",
                   "connect_time", "request_time", "wait", "wait_us", "close_needed", "ptr", "link",
                   "remote_pid", "tls", "application_name", "pool_mode", "worker")
_INTEGER = {"items", "pool_size", "min_pool_size", "reserve_pool", "max_connections", "current_connections",
            "paused", "disabled", "port", "local_port", "wait", "wait_us", "close_needed", "remote_pid", "worker",
            "pid",
            "cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login", "maxwait",
            "maxwait_us", "clients", "sessions", "servers", "tls_clients", "bits",
            "total_server_assignment_count", "total_wait_time", "avg_wait_time", "lag_bytes"}


def _columns(names) -> list[tuple[str, bool]]:
    return [(name, name in _INTEGER) for name in names]


def _time(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _connection_rows(rows: list[dict], kind: str) -> list[list]:
    now = time.time()
    out = []
    for row in rows:
        waited = now - row["waiting_since"] if row.get("waiting_since") else 0.0
        out.append([kind, row["user"], row["database"], row["state"], row["addr"], row["port"], row["local_addr"],
                    row["local_port"], _time(row["connect_time"]), _time(row["connect_time"]),
                    int(waited), int(waited * 1e6) % 1000000, 0, row["ptr"], row.get("link", ""),
                    row["remote_pid"], row["tls"], row["application_name"], row["pool_mode"], row["worker"]])
    return out


_SERVER_COLUMNS = {"active": "sv_active", "idle": "sv_idle", "tested": "sv_tested", "login": "sv_login"}


def _pools(snapshots: list[dict]) -> tuple[list[str], list[list]]:
    """PgBouncer's pools: per database, user and pool mode, clients by state and servers by
    state, and the longest wait of a client waiting now."""
    pools: dict[tuple, dict] = {}
    now = time.time()

    def pool(row) -> dict:
        key = (row["database"], row["user"], row["pool_mode"])
        return pools.setdefault(key, {"cl_active": 0, "cl_waiting": 0, "sv_active": 0, "sv_idle": 0, "sv_used": 0,
                                      "sv_tested": 0, "sv_login": 0, "maxwait": 0.0})

    for snapshot in snapshots:
        for row in snapshot["clients"]:
            if row["state"] in ("active", "idle"):
                pool(row)["cl_active"] += 1
            elif row["state"] == "waiting":
                entry = pool(row)
                entry["cl_waiting"] += 1
                if row.get("waiting_since"):
                    entry["maxwait"] = max(entry["maxwait"], now - row["waiting_since"])
        for row in snapshot["servers"]:
            column = _SERVER_COLUMNS.get(row["state"])
            if column:
                pool(row)[column] += 1
    names = ["database", "user", "cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "sv_tested",
             "sv_login", "maxwait", "maxwait_us", "pool_mode"]
    rows = []
    for (database, user, mode), entry in sorted(pools.items()):
        wait = entry.pop("maxwait")
        rows.append([database, user, *entry.values(), int(wait), int(wait * 1e6) % 1000000, mode])
    return names, rows


def _stats(snapshots: list[dict]) -> tuple[list[str], list[list]]:
    totals: dict[str, list[int]] = {}
    for snapshot in snapshots:
        for database, (count, wait_us) in snapshot["stats"].items():
            entry = totals.setdefault(database, [0, 0])
            entry[0] += count
            entry[1] += wait_us
    names = ["database", "total_server_assignment_count", "total_wait_time", "avg_wait_time"]
    return names, [[db, count, wait, wait // count if count else 0] for db, (count, wait) in sorted(totals.items())]


def _databases(snapshots: list[dict], settings) -> tuple[list[str], list[list]]:
    """PgBouncer's SHOW DATABASES for the databases pgfast serves now (it has no list of its
    own: every database PostgreSQL has is served)."""
    pgfast = settings.pgfast
    paused = {name for s in snapshots for name in s["paused"]}
    names = ["name", "host", "port", "database", "force_user", "pool_size", "min_pool_size", "reserve_pool",
             "pool_mode", "max_connections", "current_connections", "paused", "disabled"]
    seen = sorted({row["database"] for s in snapshots for row in [*s["clients"], *s["servers"]] if row["database"]})
    rows = []
    for database in seen:
        servers = sum(1 for s in snapshots for row in s["servers"] if row["database"] == database)
        rows.append([database, "", settings.port, database, "", pgfast["pgfast.pool_size"],
                     pgfast["pgfast.min_pool_size"], pgfast["pgfast.reserve_pool_size"], pgfast["pgfast.pool_mode"], 0,
                     servers, int("*" in paused or database in paused), 0])
    return names, rows


def _lists(snapshots: list[dict]) -> tuple[list[str], list[list]]:
    """PgBouncer's SHOW LISTS: counts, one row each."""
    clients = [row for s in snapshots for row in s["clients"]]
    servers = [row for s in snapshots for row in s["servers"]]
    _, pools = _pools(snapshots)
    counts = [("databases", len({row["database"] for row in [*clients, *servers] if row["database"]})),
              ("users", len({row["user"] for row in [*clients, *servers] if row["user"]})),
              ("pools", len(pools)),
              ("free_clients", 0),
              ("used_clients", sum(1 for row in clients if row["state"] != "login")),
              ("login_clients", sum(1 for row in clients if row["state"] == "login")),
              ("free_servers", 0),
              ("used_servers", len(servers))]
    return ["list", "items"], [list(count) for count in counts]


def _config(settings) -> tuple[list[str], list[list]]:
    """The values in force (a reload keeps a restart-only one), durations in seconds."""
    rows = [[name, _shown(name, settings.pgfast[name]), _shown(name, default),
             "no" if name in RESTART_PGFAST else "yes"]
            for name, (_parse, default) in sorted(PGFAST_SETTINGS.items())]
    return ["key", "value", "default", "changeable"], rows


def _shown(name: str, value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "on" if value else "off"
    if name == "pgfast.metrics_listen":
        host, port = value
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(value, tuple):        # a list setting
        return ",".join(value)
    return str(value)


def _upstream(snapshots: list[dict]) -> tuple[list[str], list[list]]:
    """Upstream mode's hosts as each worker's health checks see them (none in local mode)."""
    names = ["host", "port", "state", "lag_bytes", "last_check", "failure", "worker"]
    return names, [[row["host"], row["port"], row["state"], row["lag_bytes"],
                    _time(row["checked"]) if row["checked"] else None, row["failure"], s["worker"]]
                   for s in snapshots for row in s["upstream"]]


def _tls(snapshots: list[dict]) -> tuple[list[str], list[list]]:
    names = ["worker", "ptr", "user", "database", "addr", "port", "version", "cipher", "bits", "sni", "alpn",
             "client_dn", "client_serial", "issuer_dn"]
    rows = []
    for snapshot in snapshots:
        for row in snapshot["clients"]:
            tls = row.get("tls_facts")
            if tls:
                rows.append([snapshot["worker"], row["ptr"], row["user"], row["database"], row["addr"], row["port"],
                             *(tls[k] for k in ("version", "cipher", "bits", "sni", "alpn", "client_dn",
                                                "client_serial", "issuer_dn"))])
    return names, rows


def _workers(snapshots: list[dict]) -> tuple[list[str], list[list]]:
    names = ["worker", "pid", "clients", "sessions", "servers", "tls_clients"]
    rows = []
    for s in sorted(snapshots, key=lambda s: s["worker"]):
        sessions = sum(1 for row in s["clients"] if row["state"] != "login")
        rows.append([s["worker"], s["pid"], len(s["clients"]), sessions, len(s["servers"]),
                     sum(1 for row in s["clients"] if row.get("tls_facts"))])
    return names, rows


# --- the session ----------------------------------------------------------------------

class ConsoleSession:
    """One console client: reads its queries through the client connection (which owns the
    transport, TLS and the one way out) and answers them."""

    def __init__(self, client, frontend, role: str):
        self._client = client
        self._frontend = frontend
        self._admin = role == "admin"
        self._running: asyncio.Task | None = None      # the command in progress (a PAUSE can wait)
        # a CancelRequest came for it: its CancelledError is the client's ask, not the session ending
        self._cancel_asked = False

    async def run(self) -> None:
        client = self._client
        skipping_to_sync = False
        while True:
            kind, payload = await client.receive()
            if payload is None:
                raise ClientGone()
            if kind == ord("X"):
                client.client_finished()
                return
            if kind == ord("Q"):
                client.send(await self._simple_query(payload.rstrip(b"\0").decode("utf-8", "replace"))
                            + messages.READY_IDLE)
            elif kind == ord("S"):
                skipping_to_sync = False
                client.send(messages.READY_IDLE)
            elif not skipping_to_sync:
                skipping_to_sync = True
                client.send(messages.error("0A000", "the pgfast admin console supports only the simple query protocol",
                                           severity="ERROR"))

    def cancel(self) -> None:
        """A CancelRequest with the console session's key: a waiting PAUSE stops waiting."""
        if self._running is not None and not self._running.done():
            self._cancel_asked = True
            self._running.cancel()

    async def _simple_query(self, sql: str) -> bytes:
        statements = [s.strip() for s in sql.split(";") if s.strip()]
        if not statements:
            return messages.message(b"I", b"")
        out = []
        for statement in statements:
            self._running = asyncio.ensure_future(self._statement(statement))
            try:
                out.append(await self._running)
            except CommandError as exc:
                out.append(messages.error(exc.sqlstate, exc.message, severity="ERROR"))
                break
            except asyncio.CancelledError:
                if not self._cancel_asked:
                    raise               # the session itself is ending
                out.append(messages.error("57014", "canceling statement due to user request", severity="ERROR"))
                break
            finally:
                self._running = None
                self._cancel_asked = False
        return b"".join(out)

    async def _statement(self, statement: str) -> bytes:
        words = statement.split()
        verb = words[0].upper()
        if verb == "SHOW" and len(words) == 2:
            return await self._show(words[1].upper())
        if not self._admin and verb in ("RELOAD", "PAUSE", "RESUME", "KILL"):
            raise CommandError("42501", "admin access needed")
        if verb == "RELOAD" and len(words) == 1:
            self._frontend.request_reload()
            return messages.command_complete("RELOAD")
        if verb in ("PAUSE", "RESUME") and len(words) <= 2:
            target = words[1] if len(words) == 2 else "*"
            if verb == "PAUSE":
                await self._pause(target)
            else:
                await self._frontend.link.everywhere("resume", [target], every=True)
            return messages.command_complete(verb)
        if verb == "KILL" and len(words) == 2:
            await self._frontend.link.everywhere("kill", [words[1]], every=True)
            return messages.command_complete("KILL")
        raise CommandError("42601", f"invalid command '{statement}', use SHOW HELP;")

    async def _pause(self, database: str) -> None:
        """New transactions (sessions, under session pooling) for the database wait; the
        command returns once no backend of it is busy on any worker, as PgBouncer's PAUSE."""
        link = self._frontend.link
        await link.everywhere("pause", [database], every=True)
        while any(answer["busy"] for answer in await link.everywhere("busy", [database], every=True)):
            await asyncio.sleep(_PAUSE_POLL)

    async def _show(self, what: str) -> bytes:
        if what == "HELP":
            return _result(["help"], [[line] for line in HELP.splitlines()])
        if what == "VERSION":
            return _result(["version"], [[f"pgfast {__version__}"]])
        if what == "CONFIG":
            return _result(*_config(self._frontend.settings))
        if what not in ("POOLS", "CLIENTS", "SERVERS", "STATS", "DATABASES", "LISTS", "TLS", "WORKERS", "UPSTREAM"):
            raise CommandError("42601", f"invalid command 'SHOW {what}', use SHOW HELP;")
        snapshots = await self._frontend.link.everywhere("snapshot")
        if what == "CLIENTS":
            return _result(_CLIENT_COLUMNS, [r for s in snapshots for r in _connection_rows(s["clients"], "C")])
        if what == "SERVERS":
            return _result(_CLIENT_COLUMNS, [r for s in snapshots for r in _connection_rows(s["servers"], "S")])
        if what == "DATABASES":
            return _result(*_databases(snapshots, self._frontend.settings))
        return _result(*{"POOLS": _pools, "STATS": _stats, "LISTS": _lists, "TLS": _tls,
                         "WORKERS": _workers, "UPSTREAM": _upstream}[what](snapshots))


def _result(names, rows: list[list]) -> bytes:
    return b"".join([messages.row_description(_columns(names)), *(messages.data_row(row) for row in rows),
                     messages.command_complete("SHOW")])
