"""python -m bench: stock PostgreSQL TLS vs pgfast (default, one worker, transaction pooling) vs PgBouncer, interleaved on one cluster.

See bench/README.md for the method. Progress goes to stderr; the table goes to stdout and,
with every raw measurement, to bench/results/bench-<timestamp>.json.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import time
import traceback

from . import procs
from .arms import (ARM_NAMES, LABELS, PGBOUNCER_INSTALL, PGBOUNCER_MAX_CLIENT_CONN, PGBOUNCER_MAX_PREPARED,
                   PGBOUNCER_POOL_SIZE, PGFAST_ARM_SETTINGS, PGFAST_ARMS, STOCK_ARMS, SUSPICIOUS, PgBouncerArm, PgfastArm,
                   PgfastUpstreamArm,
                   StockArm, default_pgbouncer, default_workers, pgbouncer_version, pgbouncer_version_tuple)
from .cluster import BenchError, Cluster
from .report import Results, git_state, machine_info, summarise_log
from .scenarios import (SCENARIO_ARMS, SCENARIO_KEYS, SCENARIOS, housekeeping, run, runs_on, scenario_warm_up,
                        warm_up)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

QUICK = {"rounds": 2, "duration": 1, "warmup": 1, "scenario_warmup": 0}
FULL = {"rounds": 3, "duration": 15, "warmup": 5, "scenario_warmup": 3}


def say(text: str) -> None:
    try:
        print(text, file=sys.stderr, flush=True)
    except OSError:     # stderr gone (a closed pipe): clean-up must go on regardless
        pass


def _list(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"unknown {what}: {', '.join(bad) or value!r} (choose from {', '.join(allowed)})")
    return list(dict.fromkeys(items))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run of 3-4 minutes: {QUICK['rounds']} rounds of {QUICK['duration']} s "
                        f"(f, g: plus their connection allowance), {QUICK['warmup']} s warm-up")
    p.add_argument("--rounds", type=int, help=f"rounds of all arms (default {FULL['rounds']})")
    p.add_argument("--duration", type=int, help=f"seconds per pgbench measurement (default {FULL['duration']})")
    p.add_argument("--warmup", type=int, help=f"seconds of select-only warm-up per arm and round "
                                             f"(default {FULL['warmup']})")
    p.add_argument("--scenario-warmup", type=int,
                   help=f"seconds of the scenario's own command before each pgbench measurement "
                        f"(default {FULL['scenario_warmup']}, 0 with --quick)")
    p.add_argument("--cert", choices=("ecdsa", "rsa"), default="ecdsa",
                   help="server certificate: ECDSA P-256 (default) or RSA-2048")
    p.add_argument("--scenarios", default=",".join(SCENARIO_KEYS),
                   type=lambda v: _list(v, SCENARIO_KEYS, "scenario"),
                   help="subset of " + ",".join(SCENARIO_KEYS) + " (each runs only on its arms: see bench/scenarios.py)")
    p.add_argument("--arms", default=",".join(ARM_NAMES), type=lambda v: _list(v, ARM_NAMES, "arm"),
                   help="subset of " + ",".join(ARM_NAMES))
    p.add_argument("--pgfast-setting", action="append", default=[], metavar="NAME=VALUE",
                   help="passed to every pgfast arm's `pgfast run` as -c NAME=VALUE (repeatable, after the arm's "
                        "own settings), e.g. pgfast.pool_mode=session")
    p.add_argument("--pgbouncer", metavar="PATH",
                   help="the pgbouncer binary (default: /opt/pgbouncer-new/bin/pgbouncer when it is there, "
                        "else pgbouncer from PATH or /usr/sbin)")
    p.add_argument("--bindir", help="PostgreSQL 15 programs (default /usr/lib/postgresql/15/bin)")
    p.add_argument("--results", default=os.path.join(HERE, "results"), help="where the JSON goes")
    p.add_argument("--keep", action="store_true", help="keep the cluster and logs (for a post-mortem)")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for name in ("rounds", "duration", "warmup", "scenario_warmup"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    if args.rounds < 1 or args.duration < 1:
        p.error("--rounds and --duration must be at least 1")
    return args


def find_bindir(given: str | None) -> str:
    if given:
        return given
    if os.access("/usr/lib/postgresql/15/bin/postgres", os.X_OK):
        return "/usr/lib/postgresql/15/bin"
    from pgfast.pgbin import find_bindir as pgfast_find
    return pgfast_find()


def loud(lines: list[str]) -> None:
    bar = "!" * 78
    say(bar)
    for line in lines:
        say(f"!!! {line}")
    say(bar)


def run_block(arm, args, round_no: int, meta: dict, results: Results) -> None:
    """One arm's turn in a round: start, housekeeping, warm-up, every scenario, stop."""
    t0 = time.monotonic()
    arm.start()
    if arm.name not in meta["tls"]:
        meta["tls"][arm.name] = arm.probe_tls()
    housekeeping(arm)
    warm_up(arm, args.warmup)
    say(f"bench: round {round_no}: {arm.describe()} on port {arm.port} "
        f"(start, housekeeping and warm-up {time.monotonic() - t0:.1f} s)")
    for key in args.scenarios:
        if not runs_on(key, arm.name):
            continue
        scenario = SCENARIOS[key]
        scenario_warm_up(scenario, arm, args.scenario_warmup)
        m = run(scenario, arm, args.duration, round_no)
        results.add(m)
        front = "front –" if m.front_cpu is None else f"front {m.front_cpu:5.2f} s ({m.front_cpu_per_unit or 0:.3f})"
        say(f"  {key} {arm.name:22s} {m.value or 0:10,.1f} {m.unit:4s}  server CPU {m.server_cpu:6.2f} s "
            f"({m.cpu_per_unit or 0:.3f}/{scenario.per}), {front}, client CPU {m.client_cpu:5.2f} s, "
            f"other {m.other_cpu:5.2f} s"
            + ("" if m.ok else "  FAILED: " + "; ".join(m.errors)[:300])
            + (f"  [{len(m.log_lines)} log lines]" if m.log_lines else ""))
    arm.stop()


def main(argv=None) -> int:
    args = parse_args(argv)
    procs.install_signal_handlers()
    nofile = procs.raise_nofile()      # 500 clients (f) and PgBouncer's max_client_conn = 1000 need descriptors
    bindir = find_bindir(args.bindir)
    pg_version = subprocess.run([os.path.join(bindir, "postgres"), "--version"], capture_output=True,
                                text=True).stdout.strip()
    if " 15." not in pg_version:
        loud([f"{pg_version} in {bindir}: the anchors were measured with PostgreSQL 15"])
    if os.geteuid() == 0:
        try:
            procs.db_account()
        except KeyError:
            say("bench: running as root needs a `postgres` account to run the servers as")
            return 2

    arm_names = list(args.arms)
    pgbouncer = None
    skipped: list[str] = []
    idle = [a for a in arm_names if not any(runs_on(s, a) for s in args.scenarios)]
    if idle:
        say(f"bench: no selected scenario runs on {', '.join(idle)}; left out "
            f"(scenario -> arms: {'; '.join(f'{k}: ' + ','.join(v) for k, v in SCENARIO_ARMS.items())})")
        arm_names = [a for a in arm_names if a not in idle]
    if any(a.startswith("pgbouncer") for a in arm_names):
        pgbouncer = args.pgbouncer or default_pgbouncer()
        if args.pgbouncer and not os.access(args.pgbouncer, os.X_OK):
            say(f"bench: --pgbouncer {args.pgbouncer}: not an executable file")
            return 2
        if pgbouncer is None:
            loud(["PgBouncer is not installed: the PgBouncer arms are SKIPPED.",
                  f"Install it with:  {PGBOUNCER_INSTALL}   (Debian/Ubuntu package `pgbouncer`, as root;",
                  "then stop the service it may start: the bench runs its own PgBouncer).",
                  "Without it there are no pgfast/PgBouncer ratios in this run."])
            skipped = [a for a in arm_names if a.startswith("pgbouncer")]
            arm_names = [a for a in arm_names if not a.startswith("pgbouncer")]
    if not arm_names:
        say("bench: no arm left to measure")
        return 2

    import pgfast
    say(f"bench: {len(arm_names)} arms × {len(args.scenarios)} scenarios × {args.rounds} rounds, "
        f"{args.duration} s per pgbench measurement")
    busy = procs.other_busy_processes(exclude=set())
    if busy:
        loud(["The machine is not idle; these processes are busy (results will be noisy):"] + busy[:8])

    meta = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "quick": args.quick, "rounds": args.rounds, "duration": args.duration, "warmup": args.warmup,
        "scenario_warmup": args.scenario_warmup, "arms": arm_names, "scenarios": args.scenarios,
        "machine": machine_info(), "postgres_version": pg_version, "bindir": bindir,
        "pgbouncer_version": pgbouncer_version(pgbouncer) if pgbouncer else None,
        "pgbouncer_binary": pgbouncer,
        "pgbouncer_config": ({"max_client_conn": PGBOUNCER_MAX_CLIENT_CONN, "default_pool_size": PGBOUNCER_POOL_SIZE,
                              "max_prepared_statements": PGBOUNCER_MAX_PREPARED
                              if pgbouncer_version_tuple(pgbouncer) >= (1, 21) else None} if pgbouncer else None),
        "skipped_arms": skipped, "left_out_arms": idle,
        "labels": {a: LABELS[a] for a in arm_names},
        "pgfast_default_workers": default_workers(),
        "pgfast_arm_settings": {a: PGFAST_ARM_SETTINGS[a] + args.pgfast_setting for a in arm_names
                                if a in PGFAST_ARMS},
        "scenario_arms": {k: [a for a in SCENARIO_ARMS[k] if a in arm_names] for k in args.scenarios},
        "pgfast_version": pgfast.__version__, "pgfast_settings": args.pgfast_setting, "git": git_state(REPO),
        "busy_before_start": busy, "rlimit_nofile": nofile,
        "commands": {k: SCENARIOS[k].shown(args.duration) for k in args.scenarios},
    }
    cluster = None
    results = Results(arm_names, args.scenarios, meta)
    if skipped:
        results.notes.append(f"SKIPPED {', '.join(skipped)}: pgbouncer is not installed ({PGBOUNCER_INSTALL})")
    status = 0
    started = time.monotonic()
    try:
        cluster = Cluster(bindir, args.cert, keep=args.keep)
        say(f"bench: cluster in {cluster.root}, bulk files in {cluster.bulk_dir}")
        cluster.create(log=say)
        meta["certificate"] = cluster.cert_description
        meta["postgresql_conf"] = cluster.settings_note
        arms = {}
        for name in arm_names:
            if name == "stock":
                arms[name] = StockArm(cluster)
            elif name == "pgfast-upstream":
                arms[name] = PgfastUpstreamArm(cluster, args.pgfast_setting)
            elif name in PGFAST_ARMS:
                arms[name] = PgfastArm(cluster, name, args.pgfast_setting)
            elif name == "pgbouncer-upstream":
                arms[name] = PgBouncerArm(cluster, "session", pgbouncer, upstream=True)
            else:
                arms[name] = PgBouncerArm(cluster, name.split("-", 1)[1], pgbouncer)
        meta["tls"] = {}
        # PgBouncer and stock share the running PostgreSQL, pgfast needs it stopped (each pgfast arm
        # starts its own): the arms sharing the stock postmaster go together, the pgfast arms after
        # them, and that order rotates by one every round
        base = [a for a in arm_names if a in STOCK_ARMS] + [a for a in arm_names if a not in STOCK_ARMS]
        for round_no in range(1, args.rounds + 1):
            shift = (round_no - 1) % len(base)
            order = base[shift:] + base[:shift]
            for name in order:
                arm = arms[name]
                try:
                    run_block(arm, args, round_no, meta, results)
                except BenchError as exc:
                    # pgfast (or PgBouncer) failing must not hide the other arms' figures
                    note = f"round {round_no} {name}: FAILED: {exc}"
                    results.notes.append(note)
                    say(f"bench: {note}")
                    arm.stop()
    except KeyboardInterrupt:
        say("bench: interrupted; stopping everything it started")
        status = 130
    except procs.Interrupted as exc:
        say(f"bench: {exc}; stopping everything it started")
        status = 143
    except BenchError as exc:
        say(f"bench: FAILED: {exc}")
        status = 1
    except Exception:
        say("bench: FAILED with an unexpected error:\n" + traceback.format_exc())
        status = 1
    finally:
        procs.stop_all()
        if cluster is not None:
            try:
                cluster.wait_no_postmaster(timeout=30)
            except BenchError as exc:
                say(f"bench: {exc}")
    elapsed = time.monotonic() - started
    meta["elapsed_s"] = round(elapsed, 1)
    try:
        if cluster is not None:
            for log_name in sorted(os.listdir(cluster.logdir)):
                summary = summarise_log(os.path.join(cluster.logdir, log_name), SUSPICIOUS)
                meta.setdefault("log_summary", {})[log_name] = summary
        if results.measurements or results.notes:
            # the JSON and the logs first: nothing that happens to stdout can lose them
            path = results.write_json(args.results)
            if cluster is not None:
                logs = path[:-len(".json")] + "-logs"
                shutil.copytree(cluster.logdir, logs, dirs_exist_ok=True)
                say(f"bench: results in {path}, server logs in {logs}")
            print_report(results, meta)
        say(f"bench: done in {elapsed:.0f} s")
    finally:
        if cluster is not None:
            cluster.remove()
    failed = sum(1 for m in results.measurements if not m.ok) + sum(1 for n in results.notes if "FAILED" in n)
    if status == 0 and failed:
        say(f"bench: {failed} measurement(s) or arm turn(s) FAILED: see the notes and anomalies above")
        status = 1
    return status


def print_report(results: Results, meta: dict) -> None:
    print(results.header() + "\n\n" + results.markdown(), flush=True)
    if results.notes:
        print("\nNotes:", flush=True)
        for line in results.notes:
            print(f"- {line}", flush=True)
    anomalies = results.anomalies()
    if anomalies:
        print("\nAnomalies during measurements (errors, failed checks, log lines, a busy machine):", flush=True)
        for line in anomalies[:40]:
            print(f"- {line}", flush=True)
        if len(anomalies) > 40:
            print(f"- ... {len(anomalies) - 40} more in the JSON file", flush=True)
    for log_name, summary in meta.get("log_summary", {}).items():
        if summary:
            print(f"\nWhole-run {log_name}, lines matching ERROR/FATAL/PANIC/WARNING/Traceback "
                  f"(start-up and shutdown included):", flush=True)
            for line in summary[:12]:
                print(f"- {line}", flush=True)

if __name__ == "__main__":
    sys.exit(main())
