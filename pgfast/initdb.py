"""`pgfast init`: a new data directory that is TLS-first from its first start.

PostgreSQL's own initdb makes the cluster; pgfast then turns TLS on, writes a
self-signed certificate and a pg_hba.conf that accepts TCP only over TLS.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile

from . import accounts, conninfo
from .accounts import Account
from .errors import StartupError
from .selfsigned import write_self_signed
from .upstream import not_taken

HBA_TEMPLATE = """\
# pg_hba.conf written by pgfast init. TCP connections must use TLS (hostssl);
# see PostgreSQL's documentation for the format.
#
# TYPE   DATABASE     USER  ADDRESS        METHOD
local    all          all                  {local}
hostssl  all          all   127.0.0.1/32   {host}
hostssl  all          all   ::1/128        {host}
local    replication  all                  {local}
hostssl  replication  all   127.0.0.1/32   {host}
hostssl  replication  all   ::1/128        {host}
"""


def local_method(host_method: str) -> str:
    """What a Unix socket line gets: the same, except for cert, which only hostssl lines can
    use; there the operating-system user is the proof (peer), as in Debian's default."""
    return "peer" if host_method == "cert" else host_method

CONF_BLOCK = """
# Added by pgfast init
ssl = on
pgfast.admin_user = '{superuser}'
# the admin console (dbname=pgfast): the superuser may already do anything
pgfast.console_users = '{console_users}'
"""


def is_empty_or_missing(path: str) -> bool:
    return not os.path.exists(path) or (os.path.isdir(path) and not os.listdir(path))


def _locale_args() -> list[str]:
    # initdb takes the locale from the environment; with none set (containers, CI)
    # it would pick SQL_ASCII, which nobody wants for a new cluster
    if any(os.environ.get(name) for name in ("LC_ALL", "LC_CTYPE", "LANG")):
        return []
    return ["--locale=C", "--encoding=UTF8"]


def _prepare_directory(data_dir: str, account: Account) -> None:
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    os.chmod(data_dir, 0o700)
    if os.geteuid() == 0:
        os.chown(data_dir, account.uid, account.gid)


def _run_initdb(bindir: str, data_dir: str, account: Account, superuser: str, password: str | None) -> None:
    args = [os.path.join(bindir, "initdb"), "-D", data_dir, "-U", superuser, "--auth=trust", *_locale_args()]
    with tempfile.TemporaryDirectory(prefix="pgfast-init-") as scratch:
        if password is not None:
            # initdb reads the file as the database account, which may not be able
            # to read the caller's file; hand it a private copy instead
            if os.geteuid() == 0:
                os.chown(scratch, account.uid, account.gid)
            pwfile = os.path.join(scratch, "pwfile")
            fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
            if os.geteuid() == 0:
                os.chown(pwfile, account.uid, account.gid)
            args.append(f"--pwfile={pwfile}")
        result = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                cwd="/", **accounts.subprocess_user(account))
    if result.returncode != 0:
        raise StartupError("initdb failed", detail=(result.stderr or result.stdout).strip())


def _first_line(path: str, what: str) -> str:
    try:
        with open(path) as f:
            return f.readline().rstrip("\n")
    except OSError as exc:
        raise StartupError(f'could not read {what} file "{path}": {exc.strerror}')


def initialise(data_dir: str, bindir: str, account: Account, *, superuser: str | None = None,
               auth: str = "trust", pwfile: str | None = None, key_type: str = "ecdsa",
               key_passphrase_file: str | None = None) -> dict:
    """Create the cluster; returns what was made, for the caller to report."""
    if not is_empty_or_missing(data_dir):
        raise StartupError(f'directory "{data_dir}" exists but is not empty',
                           hint=f'Remove or empty "{data_dir}", or run pgfast with it as it is.')
    superuser = superuser or account.name
    password = _first_line(pwfile, "password") if pwfile else None
    if auth in ("password", "md5", "scram-sha-256") and password is None:
        raise StartupError(f'--auth {auth} needs --pwfile with the superuser\'s password',
                           hint="Otherwise no one could log in.")
    passphrase = _first_line(key_passphrase_file, "passphrase").encode() if key_passphrase_file else None
    _prepare_directory(data_dir, account)
    try:
        _run_initdb(bindir, data_dir, account, superuser, password)
        owner = {"owner_uid": account.uid, "owner_gid": account.gid} if os.geteuid() == 0 else {}
        write_self_signed(os.path.join(data_dir, "server.crt"), os.path.join(data_dir, "server.key"),
                          key_type=key_type, passphrase=passphrase, **owner)
        _write_config(data_dir, account, superuser, auth)
    except BaseException:
        shutil.rmtree(data_dir, ignore_errors=True)
        raise
    return {"data_dir": data_dir, "superuser": superuser, "auth": auth, "key_type": key_type,
            "encrypted_key": passphrase is not None}


def _write_config(data_dir: str, account: Account, superuser: str, auth: str) -> None:
    with open(os.path.join(data_dir, "postgresql.conf"), "a") as f:
        # a list setting's element is double-quoted, so any role name stays one element
        listed = '"' + superuser.replace('"', '""') + '"'
        f.write(CONF_BLOCK.format(superuser=superuser.replace("'", "''"), console_users=listed.replace("'", "''")))
    hba_path = os.path.join(data_dir, "pg_hba.conf")
    with open(hba_path, "w") as f:
        f.write(HBA_TEMPLATE.format(local=local_method(auth), host=auth))
    if os.geteuid() == 0:
        os.chown(hba_path, account.uid, account.gid)


UPSTREAM_HBA = """\
# pg_hba.conf written by pgfast init --upstream. pgfast decides here, then logs in to the
# upstream as the client's role with what the client proved (see the README, upstream mode).
#
# TYPE   DATABASE     USER  ADDRESS        METHOD
local    all          all                  {local}
hostssl  all          all   127.0.0.1/32   {host}
hostssl  all          all   ::1/128        {host}
"""

UPSTREAM_CONF = """\
# postgresql.conf written by pgfast init --upstream: pgfast's settings, and no PostgreSQL
# runs from this directory.
listen_addresses = 'localhost'
port = 5432
ssl = on
pgfast.upstream = '{upstream}'
# reads the upstream's catalogs and runs the health checks; its password is in upstream.pgpass
pgfast.auth_user = '{auth_user}'
pgfast.console_users = '{console_users}'
"""

PASSFILE_HEADER = """\
# hostname:port:database:username:password (libpq's .pgpass format), for the roles pgfast
# logs in to the upstream as by itself: pgfast.auth_user, and roles that log in at the front
# without a password (cert, peer, trust). pgfast refuses to start unless this file is mode 0600.
"""


def initialise_upstream(data_dir: str, account: Account, upstream: str, *, auth_user: str,
                        auth: str = "scram-sha-256", key_type: str = "ecdsa") -> dict:
    """A directory for upstream mode: pgfast's configuration, TLS files and an empty
    passfile; no PostgreSQL data."""
    if not is_empty_or_missing(data_dir):
        raise StartupError(f'directory "{data_dir}" exists but is not empty',
                           hint=f'Remove or empty "{data_dir}", or run pgfast with it as it is.')
    try:
        refused = not_taken(conninfo.parse(upstream, base_dir=os.path.abspath(data_dir)))
    except conninfo.ConninfoError as exc:
        refused = str(exc)
    if refused is not None:
        raise StartupError(f"invalid --upstream: {refused}")
    _prepare_directory(data_dir, account)
    try:
        owner = {"owner_uid": account.uid, "owner_gid": account.gid} if os.geteuid() == 0 else {}
        write_self_signed(os.path.join(data_dir, "server.crt"), os.path.join(data_dir, "server.key"),
                          key_type=key_type, **owner)
        listed = '"' + auth_user.replace('"', '""') + '"'
        files = {"postgresql.conf": UPSTREAM_CONF.format(upstream=upstream.replace("\\", "\\\\").replace("'", "''"),
                                                         auth_user=auth_user.replace("'", "''"),
                                                         console_users=listed.replace("'", "''")),
                 "pg_hba.conf": UPSTREAM_HBA.format(local=local_method(auth), host=auth),
                 "pg_ident.conf": "", "upstream.pgpass": PASSFILE_HEADER,
                 "postgresql.auto.conf": "# Do not edit this file manually!\n"
                                         "# It will be overwritten by the ALTER SYSTEM command.\n"}
        for name, text in files.items():
            path = os.path.join(data_dir, name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            if os.geteuid() == 0:
                os.chown(path, account.uid, account.gid)
    except BaseException:
        shutil.rmtree(data_dir, ignore_errors=True)
        raise
    return {"data_dir": data_dir, "upstream": upstream, "auth_user": auth_user, "auth": auth}


def upstream_report(info: dict) -> str:
    passfile = os.path.join(info["data_dir"], "upstream.pgpass")
    return "\n".join([
        f'Initialised "{info["data_dir"]}" for pgfast in upstream mode, in front of:',
        f'  {info["upstream"]}',
        f'  pg_hba.conf method {info["auth"]}, TCP over TLS only (hostssl); self-signed server.crt and server.key',
        "", f'Give pgfast.auth_user ("{info["auth_user"]}") its password in {passfile}, e.g.',
        f'    *:*:*:{info["auth_user"]}:PASSWORD', "",
        "Start it with:", f'    pgfast run -D {info["data_dir"]}'])


def connection_string(info: dict, port: int) -> str:
    crt = os.path.join(info["data_dir"], "server.crt")
    return (f'host=localhost port={port} dbname=postgres user={info["superuser"]} '
            f'sslmode=verify-full sslrootcert={crt}')


def report(info: dict, port: int) -> str:
    lines = [
        f'Initialised PostgreSQL data directory "{info["data_dir"]}" for pgfast:',
        f'  superuser "{info["superuser"]}", pg_hba.conf method {info["auth"]} (Unix sockets: '
        f'{local_method(info["auth"])}), TCP over TLS only (hostssl)',
        f'  ssl = on; server.crt and server.key: self-signed {info["key_type"].upper()} certificate for '
        f'localhost, 127.0.0.1, ::1 and {socket.gethostname()}',
    ]
    if info["auth"] == "cert":
        lines.append("  cert authentication needs the CA that signs client certificates: put it in "
                     f'{os.path.join(info["data_dir"], "root.crt")} (or set ssl_ca_file)')
    if info["encrypted_key"]:
        lines.append("  server.key is encrypted: pgfast run asks for its passphrase on the terminal, "
                     "or set ssl_passphrase_command")
    lines += ["", "Start it with:", f'    pgfast run -D {info["data_dir"]}', "", "Connect with:",
              f'    psql "{connection_string(info, port)}"']
    return "\n".join(lines)
