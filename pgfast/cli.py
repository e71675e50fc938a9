"""The pgfast command: `pgfast init`, `pgfast run`, and pg_ctl's verbs (ctl.py)."""
from __future__ import annotations

import argparse
import os
import shlex
import sys

from . import __version__, log
from .errors import PostgresRefused, StartupError


def _data_dir(value: str | None) -> str:
    value = value or os.environ.get("PGDATA")
    if not value:
        raise StartupError("no data directory specified",
                           hint="Specify it with -D or set the PGDATA environment variable.")
    return os.path.abspath(value)


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f'-c {text} requires a value (NAME=VALUE)')
    return name.strip().lower(), value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgfast", description="A fast, TLS-first front door for PostgreSQL.")
    parser.add_argument("--version", action="version", version=f"pgfast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    init = commands.add_parser("init", help="create a data directory that serves TLS from the start")
    init.add_argument("-D", dest="data_dir", metavar="DIR", help="data directory (default: $PGDATA)")
    init.add_argument("-U", dest="superuser", metavar="SUPERUSER", help="database superuser name")
    init.add_argument("--auth", default="trust", choices=["trust", "cert", "password", "md5", "scram-sha-256"],
                      help="pg_hba.conf method for local and TCP connections (default: trust)")
    init.add_argument("--pwfile", metavar="FILE", help="read the superuser's password from FILE")
    init.add_argument("--key-type", default="ecdsa", choices=["ecdsa", "rsa"],
                      help="server key: ECDSA P-256 (default) or RSA-2048")
    init.add_argument("--key-passphrase-file", metavar="FILE", help="encrypt server.key with the passphrase in FILE")
    init.add_argument("--user", metavar="NAME", help="account to run PostgreSQL as when started as root")
    init.add_argument("--upstream", metavar="CONNINFO",
                      help="upstream mode: front the PostgreSQL servers this libpq connection string names")

    run = commands.add_parser("run", add_help=False, help="serve clients from a data directory")
    run.add_argument("--help", action="help", help="show this help message and exit")
    run.add_argument("-D", dest="data_dir", metavar="DIR", help="data directory (default: $PGDATA)")
    run.add_argument("-p", dest="port", metavar="PORT", help="port to listen on")
    run.add_argument("-h", dest="listen_addresses", metavar="ADDRESSES", help="addresses to listen on")
    run.add_argument("-c", dest="settings", metavar="NAME=VALUE", type=_setting, action="append", default=[],
                     help="set a configuration parameter (wins over postgresql.conf)")
    run.add_argument("--user", metavar="NAME", help="account to run PostgreSQL as when started as root")

    start = commands.add_parser("start", help="start pgfast in the background (as pg_ctl start)")
    start.add_argument("-D", dest="data_dir", metavar="DIR", help="data directory (default: $PGDATA)")
    start.add_argument("-l", dest="logfile", metavar="FILENAME", help="append the server log to FILENAME")
    start.add_argument("-o", dest="options", metavar="OPTIONS", default="",
                       help='options for "pgfast run", e.g. "-p 6432 -c ssl=on"')
    _wait_options(start)
    stop = commands.add_parser("stop", help="shut pgfast down (as pg_ctl stop)")
    stop.add_argument("-D", dest="data_dir", metavar="DIR", help="data directory (default: $PGDATA)")
    stop.add_argument("-m", dest="mode", metavar="MODE", default="fast",
                      help="smart (wait for clients to leave), fast (default: end sessions) or immediate")
    _wait_options(stop)
    for name, text in (("reload", "make pgfast and PostgreSQL re-read their configuration"),
                       ("status", "say whether pgfast is running (exit 3 when it is not)")):
        verb = commands.add_parser(name, help=text)
        verb.add_argument("-D", dest="data_dir", metavar="DIR", help="data directory (default: $PGDATA)")
    return parser


def _wait_options(verb: argparse.ArgumentParser) -> None:
    verb.add_argument("-w", dest="wait", action="store_true", default=True, help="wait until done (default)")
    verb.add_argument("-W", dest="wait", action="store_false", help="do not wait")
    verb.add_argument("-t", dest="timeout", metavar="SECS", type=float, default=60.0,
                      help="seconds to wait (default: 60)")


def _init(args) -> int:
    from . import accounts, initdb, pgbin
    data_dir = _data_dir(args.data_dir)
    account = accounts.database_account(data_dir, args.user)
    if args.upstream is not None:
        info = initdb.initialise_upstream(data_dir, account, args.upstream, auth_user=args.superuser or "postgres",
                                          auth="scram-sha-256" if args.auth == "trust" else args.auth,
                                          key_type=args.key_type)
        print(initdb.upstream_report(info))
        return 0
    bindir, how = pgbin.locate()
    pgbin.announce(bindir, how)
    info = initdb.initialise(data_dir, bindir, account, superuser=args.superuser, auth=args.auth,
                             pwfile=args.pwfile, key_type=args.key_type,
                             key_passphrase_file=args.key_passphrase_file)
    print(initdb.report(info, 5432))
    return 0


def _run(args) -> int:
    from .run import run
    overrides = list(args.settings)
    if args.port is not None:
        overrides.append(("port", args.port))
    if args.listen_addresses is not None:
        overrides.append(("listen_addresses", args.listen_addresses))
    return run(_data_dir(args.data_dir), overrides, args.user)


def _ctl(args) -> int:
    from . import ctl
    from .shutdown import Mode
    data_dir = _data_dir(args.data_dir)
    if args.command == "start":
        return ctl.start(data_dir, args.logfile, args.wait, args.timeout, shlex.split(args.options))
    if args.command == "stop":
        try:
            mode = Mode.named(args.mode)
        except ValueError as exc:
            sys.stderr.write(f"pgfast: {exc}\n")
            return 1
        return ctl.stop(data_dir, mode, args.wait, args.timeout)
    if args.command == "reload":
        return ctl.reload(data_dir)
    return ctl.status(data_dir)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "init":
            return _init(args)
        if args.command == "run":
            return _run(args)
        return _ctl(args)
    except PostgresRefused as exc:
        sys.stderr.write(exc.output)
        return 1
    except StartupError as exc:
        for message, context in exc.preceding:
            log.log(message, context=context)
        log.fatal(exc.message, detail=exc.detail, hint=exc.hint, context=exc.context)
        return 1
    except KeyboardInterrupt:
        return 1
