"""`pgfast run` and `pgfast init` as a user runs them, and every way start-up must fail.

Every failure is checked the same way (expect_fatal): exit status 1 within a timeout, exactly
one FATAL line worded as PostgreSQL words it (with its DETAIL/HINT), and nothing left behind:
the TCP port can be bound again, no PostgreSQL process runs in the data directory, its
postmaster.pid is gone (or names a dead process) and pgfast's Unix socket file is removed.
Messages that PostgreSQL also has were checked against PostgreSQL 15.18 started on the same
broken data directory.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import pexpect
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography import x509

import certs
from conftest import (READY, Pgfast, alive, append_conf, chown_tree, db_account, free_port, port_is_free, psql,
                      server_has_openssl, server_major, write_file)
from pgfast import __version__

AS_ROOT = os.geteuid() == 0
requires_root = pytest.mark.skipif(not AS_ROOT, reason="needs root (other accounts, dropping privileges)")
PASSPHRASE = "correct-horse-battery"
PROMPT = "Enter PEM pass phrase:"
PERMISSIONS_DETAIL = ("File must have permissions u=rw (0600) or less if owned by the database user, "
                      "or permissions u=rw,g=r (0640) or less if owned by root.")
FAIL_TIMEOUT = 20          # a failing start must end well within this
ANY = object()             # expect_fatal: DETAIL/HINT not checked

_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \S+ \[(\d+)\] (?:\S+ )?([A-Z0-9]+):  (.*)$")


# ---------------------------------------------------------------- helpers

def log_entries(output: str) -> list[tuple[int, str, str]]:
    """(pid, level, text) for every server log line in output."""
    return [(int(m[1]), m[2], m[3]) for line in output.splitlines() if (m := _LOG_LINE.match(line))]


def _matches(expected, actual: str | None) -> bool:
    if expected is ANY:
        return True
    if isinstance(expected, re.Pattern):
        return actual is not None and expected.search(actual) is not None
    return expected == actual


def assert_one_fatal(output: str, message, detail=None, hint=None) -> None:
    """Exactly one FATAL line, with this message and these DETAIL/HINT lines (None: none)."""
    entries = log_entries(output)
    fatals = [i for i, (_, level, _) in enumerate(entries) if level == "FATAL"]
    assert len(fatals) == 1, f"expected exactly one FATAL line:\n{output}"
    pid, _, text = entries[fatals[0]]
    extra = {}
    for other_pid, level, other_text in entries[fatals[0] + 1:]:
        if other_pid != pid or level not in ("DETAIL", "HINT"):
            break
        extra[level] = other_text
    assert _matches(message, text), f"FATAL was {text!r}, expected {message!r}:\n{output}"
    assert _matches(detail, extra.get("DETAIL")), f"DETAIL was {extra.get('DETAIL')!r}:\n{output}"
    assert _matches(hint, extra.get("HINT")), f"HINT was {extra.get('HINT')!r}:\n{output}"


def postgres_processes(data_dir: str) -> list[int]:
    """PostgreSQL processes of data_dir: they all run with it as working directory."""
    real = os.path.realpath(data_dir)
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{name}/cwd")
            with open(f"/proc/{name}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if cwd == real and comm.startswith("postgres"):
            found.append(int(name))
    return found


def pid_file_pid(data_dir: str) -> int | None:
    try:
        with open(os.path.join(data_dir, "postmaster.pid")) as f:
            return int(f.readline())
    except (FileNotFoundError, ValueError):
        return None


def pid_file_lines(data_dir: str) -> list[str]:
    with open(os.path.join(data_dir, "postmaster.pid")) as f:
        return f.read().splitlines()


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


def assert_nothing_left(data_dir: str, port: int | None, socket_dir: str | None, *, grace: float = 5) -> None:
    """No listener on port, no PostgreSQL in data_dir, postmaster.pid gone or dead, socket removed."""
    deadline = time.monotonic() + grace
    while postgres_processes(data_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert postgres_processes(data_dir) == [], "PostgreSQL processes left running"
    pid = pid_file_pid(data_dir)
    assert pid is None or not alive(pid), f"postmaster.pid names live process {pid}"
    if port is not None:
        assert port_is_free(port), f"port {port} is still taken"
    if socket_dir is not None and port is not None:
        assert not os.path.exists(os.path.join(socket_dir, f".s.PGSQL.{port}"))


def make_socket_dir(parent: str) -> str:
    path = tempfile.mkdtemp(prefix="sock-", dir=parent)
    os.chmod(path, 0o777)
    return path


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(extra)
    return env


@dataclass
class Run:
    returncode: int
    output: str
    elapsed: float


def pgfast_cli(*args: str, env: dict | None = None, timeout: float = FAIL_TIMEOUT) -> Run:
    """`python -m pgfast ARGS` to completion, stdin not a terminal, stdout and stderr together."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pgfast", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=timeout, env=env if env is not None else clean_env())
    return Run(result.returncode, result.stdout, time.monotonic() - started)


def expect_fatal(data_dir: str, *args: str, message, detail=None, hint=None, env: dict | None = None,
                 port: int | None = None, check_port: bool = True, check_pid_file: bool = True) -> Run:
    """`pgfast run -D data_dir ARGS` must fail as PostgreSQL would and leave nothing behind."""
    port = port or free_port()
    socket_dir = make_socket_dir(os.path.dirname(os.path.abspath(data_dir)))
    run = pgfast_cli("run", "-D", data_dir, "-p", str(port), "-c", f"unix_socket_directories={socket_dir}",
                     *args, env=env)
    assert run.returncode == 1, f"exit status {run.returncode}:\n{run.output}"
    assert_one_fatal(run.output, message, detail, hint)
    if check_pid_file:
        assert_nothing_left(data_dir, port if check_port else None, socket_dir)
    assert not os.path.exists(os.path.join(socket_dir, f".s.PGSQL.{port}"))
    return run


def put(path: str, data: bytes, mode: int = 0o600, uid: int | None = None) -> str:
    """Write data with exactly this mode, owned by uid (default: the database account)."""
    certs.write(path, data, mode)
    if AS_ROOT:
        account = db_account()
        os.chown(path, account.pw_uid if uid is None else uid, account.pw_gid)
    return path


def tls_dsn(server: Pgfast, root_cert: str, **params) -> str:
    return server.dsn(host="localhost", sslmode="verify-full", sslrootcert=root_cert, **params)


def assert_tls_query(bindir: str, dsn: str, env: dict) -> None:
    result = psql(bindir, dsn, "SELECT 'served'", env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "served"


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def ca() -> certs.CA:
    return certs.CA()


@pytest.fixture(scope="module")
def server_cert(ca) -> certs.Issued:
    return ca.server_cert()


def _turn_tls_on(data_dir: str, server_cert: certs.Issued, ca: certs.CA) -> str:
    put(os.path.join(data_dir, "server.crt"), server_cert.chain_pem(), 0o644)
    put(os.path.join(data_dir, "server.key"), server_cert.key_pem(), 0o600)
    put(os.path.join(data_dir, "ca.crt"), ca.cert_pem(), 0o644)
    append_conf(data_dir, "ssl = on")
    return data_dir


@pytest.fixture
def tls_cluster(cluster, server_cert, ca) -> str:
    """A data directory with ssl = on, server.crt (0644) and server.key (0600, database account)."""
    return _turn_tls_on(cluster, server_cert, ca)


@pytest.fixture(scope="module")
def _shared_tls_dir(template_cluster, module_dir, server_cert, ca) -> str:
    data = os.path.join(module_dir, "shared-tls")
    shutil.copytree(template_cluster, data, symlinks=True)
    os.chmod(data, 0o700)
    chown_tree(data)
    return _turn_tls_on(data, server_cert, ca)


_RESTORED = ("postgresql.conf", "pg_hba.conf", "server.crt", "server.key", "ca.crt")


@pytest.fixture
def tls_dir(_shared_tls_dir) -> str:
    """Like tls_cluster, for tests in which PostgreSQL never starts: one data directory for
    the module, whose configuration and TLS files are put back after each test."""
    saved = {}
    for name in _RESTORED:
        path = os.path.join(_shared_tls_dir, name)
        with open(path, "rb") as f:
            saved[name] = (f.read(), os.stat(path))
    yield _shared_tls_dir
    for name, (data, st) in saved.items():
        path = os.path.join(_shared_tls_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)
        certs.write(path, data, stat.S_IMODE(st.st_mode))
        if AS_ROOT:
            os.chown(path, st.st_uid, st.st_gid)
    assert not os.path.exists(os.path.join(_shared_tls_dir, "postmaster.pid"))


@pytest.fixture(scope="module")
def initialised(module_dir) -> tuple[str, Run]:
    """`pgfast init -D DIR` with every default."""
    data_dir = os.path.join(module_dir, "init-default")
    run = pgfast_cli("init", "-D", data_dir, timeout=60)
    assert run.returncode == 0, run.output
    return data_dir, run


@pytest.fixture(scope="module")
def encrypted(module_dir) -> str:
    """`pgfast init --key-passphrase-file`: server.key encrypted with PASSPHRASE."""
    passphrase_file = os.path.join(module_dir, "passphrase")
    with open(passphrase_file, "w") as f:
        f.write(PASSPHRASE + "\n")
    data_dir = os.path.join(module_dir, "init-encrypted")
    run = pgfast_cli("init", "-D", data_dir, "--key-passphrase-file", passphrase_file, timeout=60)
    assert run.returncode == 0, run.output
    return data_dir


@pytest.fixture(scope="module")
def served(initialised, module_dir, module_env):
    """One `pgfast run` on the `pgfast init` directory, shared by the tests that only look."""
    data_dir, _ = initialised
    server = Pgfast(data_dir, free_port(), make_socket_dir(module_dir), [], dict(module_env))
    server.start()
    yield server
    assert server.stop() == 0, server.log


def start_server(data_dir: str, scratch: str, env: dict, *args: str) -> Pgfast:
    return Pgfast(data_dir, free_port(), make_socket_dir(scratch), list(args), dict(env))


@pytest.fixture
def servers():
    """Pgfast processes a test starts itself; stopped (SIGTERM, then SIGKILL) if still running."""
    started: list[Pgfast] = []
    yield started
    for server in started:
        if server.process is not None and server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
            try:
                server.process.wait(30)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait()


# ---------------------------------------------------------------- TLS files and settings

def _remove(path: str) -> None:
    os.unlink(path)


TLS_FAILURES = {
    "server.crt missing": (
        lambda d, other: _remove(f"{d}/server.crt"), [],
        'could not load server certificate file "server.crt": No such file or directory', None),
    "server.key missing": (
        lambda d, other: _remove(f"{d}/server.key"), [],
        'could not access private key file "server.key": No such file or directory', None),
    "key world-readable": (
        lambda d, other: os.chmod(f"{d}/server.key", 0o644), [],
        'private key file "server.key" has group or world access', PERMISSIONS_DETAIL),
    "key group-readable": (
        lambda d, other: os.chmod(f"{d}/server.key", 0o640), [],
        'private key file "server.key" has group or world access', PERMISSIONS_DETAIL),
    "key is a directory": (
        lambda d, other: (_remove(f"{d}/server.key"), os.mkdir(f"{d}/server.key", 0o700),
                          chown_tree(f"{d}/server.key")), [],
        'private key file "server.key" is not a regular file', None),
    "key of another certificate": (
        lambda d, other: put(f"{d}/server.key", other.key_pem()), [],
        'could not load private key file "server.key": key values mismatch', None),
    "ssl_ca_file missing": (
        lambda d, other: None, ["-c", "ssl_ca_file=missing-ca.crt"],
        'could not load root certificate file "missing-ca.crt": No such file or directory', None),
    "ssl_crl_file missing": (
        lambda d, other: append_conf(d, "ssl_ca_file = 'ca.crt'\nssl_crl_file = 'missing.crl'"), [],
        'could not load SSL certificate revocation list file "missing.crl": No such file or directory', None),
    "bad ssl_ciphers": (
        lambda d, other: append_conf(d, "ssl_ciphers = 'NO-SUCH-CIPHER'"), [],
        f"could not set the {'TLSv1.2 ' if server_major() >= 18 else ''}cipher list (no valid ciphers available)",
        None),
    "bad ssl_ecdh_curve": (     # PostgreSQL 18: the old name of ssl_groups
        lambda d, other: append_conf(d, "ssl_ecdh_curve = 'nosuchcurve'"), [],
        "could not set group names specified in ssl_groups: No valid groups found" if server_major() >= 18
        else "ECDH: unrecognized curve name: nosuchcurve", None),
    "ssl_min_protocol_version above max": (
        lambda d, other: None, ["-c", "ssl_min_protocol_version=TLSv1.3", "-c", "ssl_max_protocol_version=TLSv1.2"],
        "could not set SSL protocol version range",
        '"ssl_min_protocol_version" cannot be higher than "ssl_max_protocol_version"'),
    "missing cert is reported before a bad key": (
        lambda d, other: (_remove(f"{d}/server.crt"), os.chmod(f"{d}/server.key", 0o644)), [],
        'could not load server certificate file "server.crt": No such file or directory', None),
}


@pytest.mark.parametrize("case", TLS_FAILURES)
def test_tls_setup_failure(tls_dir, ca, case):
    breaks, args, message, detail = TLS_FAILURES[case]
    breaks(tls_dir, ca.server_cert())
    hint = None
    if case == "bad ssl_ecdh_curve" and server_major() >= 18:
        hint = "Ensure that each group name is spelled correctly and supported by the installed version of OpenSSL."
    expect_fatal(tls_dir, *args, message=message, detail=detail, hint=hint)


@requires_root
def test_key_owned_by_another_account(tls_dir):
    other = next(uid for uid in (65534, 2000) if uid != db_account().pw_uid)    # nobody
    os.chown(os.path.join(tls_dir, "server.key"), other, -1)
    expect_fatal(tls_dir, message='private key file "server.key" must be owned by the database user or root')


@requires_root
def test_key_owned_by_root_with_group_read_is_accepted(tls_cluster, pgfast_factory, bindir, client_env):
    """PostgreSQL's rule for a root-owned key (0640 allowed): the start-up check is not too strict."""
    key = os.path.join(tls_cluster, "server.key")
    os.chown(key, 0, db_account().pw_gid)
    os.chmod(key, 0o640)
    server = pgfast_factory(tls_cluster)
    assert_tls_query(bindir, tls_dsn(server, os.path.join(tls_cluster, "ca.crt")), client_env)


# ---------------------------------------------------------------- encrypted key

def test_passphrase_command_starts_and_serves_tls(encrypted, scratch, client_env, servers, bindir):
    server = start_server(encrypted, scratch, client_env, "-c", f"ssl_passphrase_command=echo {PASSPHRASE}")
    servers.append(server)
    server.start()
    assert_tls_query(bindir, tls_dsn(server, os.path.join(encrypted, "server.crt")), client_env)
    assert server.stop() == 0


def test_wrong_passphrase_from_command(encrypted):
    expect_fatal(encrypted, "-c", "ssl_passphrase_command=echo wrong-passphrase",
                 message='could not load private key file "server.key": bad decrypt')


def test_failing_passphrase_command(encrypted):
    expect_fatal(encrypted, "-c", "ssl_passphrase_command=exit 3",
                 message='command "exit 3" failed', detail="child process exited with exit code 3")


def test_encrypted_key_without_terminal_or_command_fails_at_once(encrypted):
    run = expect_fatal(encrypted, message=re.compile(r'^private key file "server\.key" requires a passphrase'),
                       hint=ANY)
    assert run.elapsed < 10


def spawn_on_terminal(data_dir: str, port: int, socket_dir: str, env: dict) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, ["-m", "pgfast", "run", "-D", data_dir, "-p", str(port),
                                          "-c", f"unix_socket_directories={socket_dir}"],
                         env=env, timeout=FAIL_TIMEOUT, encoding="utf-8")


def test_passphrase_typed_on_terminal(encrypted, scratch, client_env, bindir):
    port, socket_dir = free_port(), make_socket_dir(scratch)
    child = spawn_on_terminal(encrypted, port, socket_dir, client_env)
    try:
        child.expect_exact(PROMPT)
        time.sleep(0.3)
        assert not accepts(port), "pgfast listens before it has the passphrase"
        assert postgres_processes(encrypted) == []
        child.sendline(PASSPHRASE)
        child.expect_exact(f"[{child.pid}] {READY}")
        assert PASSPHRASE not in child.before          # not echoed
        dsn = f"host=localhost port={port} dbname=postgres user=postgres connect_timeout=10 " \
              f"sslmode=verify-full sslrootcert={encrypted}/server.crt"
        assert_tls_query(bindir, dsn, client_env)
        child.kill(signal.SIGTERM)
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        if child.isalive():
            child.kill(signal.SIGKILL)
            child.close(force=True)
    assert_nothing_left(encrypted, port, socket_dir)


def test_wrong_passphrase_typed_on_terminal(encrypted, scratch, client_env):
    port, socket_dir = free_port(), make_socket_dir(scratch)
    child = spawn_on_terminal(encrypted, port, socket_dir, client_env)
    try:
        child.expect_exact(PROMPT)
        child.sendline("not-the-passphrase")
        child.expect(pexpect.EOF)
        child.close()
        output = child.before
    finally:
        if child.isalive():
            child.kill(signal.SIGKILL)
            child.close(force=True)
    assert child.exitstatus == 1, output
    assert_one_fatal(output, 'could not load private key file "server.key": bad decrypt')
    assert_nothing_left(encrypted, port, socket_dir)


# ---------------------------------------------------------------- pg_hba.conf

def write_hba(data_dir: str, line: str) -> str:
    path = os.path.join(data_dir, "pg_hba.conf")
    put(path, f"# TYPE DATABASE USER ADDRESS METHOD\nlocal all all trust\n{line}\n".encode())
    return path


@pytest.mark.parametrize("line", [
    "host all all 127.0.0.1/32 ldap ldapserver=ldap.example.net",
    "host all all 127.0.0.1/32 gss",
    "host all all 127.0.0.1/32 radius radiusservers=radius.example.net radiussecrets=s",
    "host all all 127.0.0.1/32 pam",
    "host all all 127.0.0.1/32 ident",
])
def test_hba_method_pgfast_cannot_honour(tls_dir, line):
    method = line.split()[4]
    path = write_hba(tls_dir, line)
    expect_fatal(tls_dir,
                 message=f'authentication method "{method}" is not supported by pgfast in file "{path}" line 3')


# Password authentication arrives with a later issue. When a method is supported, flip its
# value to True: the same test then checks that pgfast starts with it.
@pytest.mark.parametrize("method", ["md5", "scram-sha-256", "password"])
def test_hba_password_methods_start(tls_dir, method, pgfast_factory):
    write_hba(tls_dir, f"hostssl all all 127.0.0.1/32 {method}")
    assert pgfast_factory(tls_dir).stop() == 0


def test_hba_syntax_error_names_file_and_line(tls_dir):
    path = write_hba(tls_dir, "hostssl all all 127.0.0.1/32 nosuchmethod")
    expect_fatal(tls_dir, message=f'invalid authentication method "nosuchmethod" in file "{path}" line 3')


# ---------------------------------------------------------------- postgresql.conf and -c

def conf_line_count(data_dir: str) -> int:
    with open(os.path.join(data_dir, "postgresql.conf")) as f:
        return f.read().count("\n")


def test_unknown_parameter_in_postgresql_conf(tls_dir):
    append_conf(tls_dir, "foo = 1")
    line = conf_line_count(tls_dir)
    conf = os.path.join(tls_dir, "postgresql.conf")
    expect_fatal(tls_dir, message=f'unrecognized configuration parameter "foo" in file "{conf}" line {line}')


def test_bad_value_in_postgresql_conf(tls_dir):
    append_conf(tls_dir, "max_connections = lots")
    line = conf_line_count(tls_dir)
    conf = os.path.join(tls_dir, "postgresql.conf")
    expect_fatal(tls_dir,
                 message=f'invalid value for parameter "max_connections": "lots" in file "{conf}" line {line}')


def test_bad_value_of_a_postgresql_only_setting(tls_dir):
    append_conf(tls_dir, "work_mem = lots")
    conf = os.path.join(tls_dir, "postgresql.conf")
    # PostgreSQL's wording, or pgfast's own for the settings it checks itself
    expect_fatal(tls_dir, message=re.compile(
        rf'^configuration file "{re.escape(conf)}" contains errors$'
        rf'|^invalid value for parameter "work_mem": "lots" in file "{re.escape(conf)}" line \d+$'),
        detail=ANY, hint=ANY)


@pytest.mark.parametrize("setting, message", [
    ("foo=1", 'unrecognized configuration parameter "foo"'),
    ("pgfast.nonsense=1", 'unrecognized configuration parameter "pgfast.nonsense"'),
    ("port=abc", 'invalid value for parameter "port": "abc"'),
])
def test_bad_command_line_setting(tls_dir, setting, message):
    expect_fatal(tls_dir, "-c", setting, message=message)


def test_unknown_pgfast_setting_in_postgresql_conf(tls_dir):
    append_conf(tls_dir, "pgfast.nonsense = on")
    line = conf_line_count(tls_dir)
    conf = os.path.join(tls_dir, "postgresql.conf")
    expect_fatal(tls_dir,
                 message=f'unrecognized configuration parameter "pgfast.nonsense" in file "{conf}" line {line}')


# ---------------------------------------------------------------- already running, port taken

def test_lock_file_of_a_running_postgresql(tls_cluster, scratch, server_bindir):
    if not server_has_openssl():
        pytest.skip("this PostgreSQL cannot start on a data directory with ssl = on by itself")
    account = db_account()
    socket_dir = make_socket_dir(scratch)
    pg_ctl = os.path.join(server_bindir, "pg_ctl")
    as_db = {"user": account.pw_uid, "group": account.pw_gid} if AS_ROOT else {}
    subprocess.run([pg_ctl, "-D", tls_cluster, "-w", "-t", "30", "-l", os.path.join(socket_dir, "pg.log"),
                    "-o", f"-c listen_addresses='' -c unix_socket_directories={socket_dir} -c port={free_port()}",
                    "start"], check=True, capture_output=True, cwd="/", timeout=60, **as_db)
    try:
        pid = pid_file_pid(tls_cluster)
        port = free_port()
        expect_fatal(tls_cluster, port=port, check_pid_file=False,
                     message='lock file "postmaster.pid" already exists',
                     hint=f'Is another postmaster (PID {pid}) running in data directory "{tls_cluster}"?')
        assert port_is_free(port)
        assert pid_file_pid(tls_cluster) == pid and alive(pid)     # the running one is untouched
    finally:
        subprocess.run([pg_ctl, "-D", tls_cluster, "-w", "-m", "fast", "stop"], capture_output=True,
                       cwd="/", timeout=60, **as_db)


def test_second_pgfast_on_the_same_data_directory(tls_cluster, pgfast_factory, bindir, client_env):
    first = pgfast_factory(tls_cluster)
    pid = pid_file_pid(tls_cluster)
    port = free_port()
    expect_fatal(tls_cluster, port=port, check_pid_file=False,
                 message='lock file "pgfast.pid" already exists',
                 hint=f'Is another pgfast (PID {first.process.pid}) running in data directory "{tls_cluster}"?')
    assert port_is_free(port)
    assert first.process.poll() is None and pid_file_pid(tls_cluster) == pid
    assert_tls_query(bindir, tls_dsn(first, os.path.join(tls_cluster, "ca.crt")), client_env)


def test_port_in_use(tls_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = expect_fatal(tls_dir, "-h", "127.0.0.1", port=port, check_port=False,
                           message="could not create any TCP/IP sockets")
    entries = [(level, text) for _, level, text in log_entries(run.output)]
    assert entries[:3] == [
        ("LOG", 'could not bind IPv4 address "127.0.0.1": Address already in use'),
        ("HINT", f"Is another postmaster already running on port {port}? If not, wait a few seconds and retry."),
        ("WARNING", 'could not create listen socket for "127.0.0.1"'),
    ], run.output
    assert postgres_processes(tls_dir) == []


# ---------------------------------------------------------------- data directory, binaries, account

def test_not_a_data_directory(scratch):
    data_dir = os.path.join(scratch, "notdata")
    os.mkdir(data_dir, 0o755)
    with open(os.path.join(data_dir, "notes.txt"), "w") as f:
        f.write("not a cluster\n")
    expect_fatal(data_dir, message=f'"{data_dir}" is not a valid data directory',
                 detail='File "PG_VERSION" is missing.')
    assert os.listdir(data_dir) == ["notes.txt"]      # not initialised over


@pytest.mark.parametrize("command", ["run", "init"])
def test_no_data_directory_given(command, scratch):
    run = pgfast_cli(command, env=clean_env())
    assert run.returncode == 1, run.output
    assert_one_fatal(run.output, "no data directory specified",
                     hint=re.compile(r"-D.*PGDATA"))


def test_pgdata_is_the_default_data_directory(tls_cluster, scratch, client_env, servers, bindir):
    server = start_server(tls_cluster, scratch, dict(client_env, PGDATA=tls_cluster))
    i = server.command.index("-D")
    del server.command[i:i + 2]
    servers.append(server)
    server.start()
    assert_tls_query(bindir, tls_dsn(server, os.path.join(tls_cluster, "ca.crt")), client_env)
    assert server.stop() == 0


def test_version():
    module = subprocess.run([sys.executable, "-m", "pgfast", "--version"], capture_output=True, text=True,
                            timeout=FAIL_TIMEOUT)
    console_script = os.path.join(os.path.dirname(sys.executable), "pgfast")
    if not os.path.exists(console_script):
        console_script = shutil.which("pgfast")
    assert console_script, "the pgfast console script is not installed"
    script = subprocess.run([console_script, "--version"],
                            capture_output=True, text=True, timeout=FAIL_TIMEOUT)
    for result in (module, script):
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"pgfast {__version__}\n"


def test_postgres_bin_without_postgres(tls_dir, scratch):
    empty = os.path.join(scratch, "bin")
    os.mkdir(empty)
    expect_fatal(tls_dir, "-c", f"pgfast.postgres_bin={empty}",
                 message=f'pgfast.postgres_bin "{empty}" does not contain an executable "postgres"')


@requires_root
def test_unknown_user(tls_dir):
    expect_fatal(tls_dir, "--user", "nosuchuser",
                 message=re.compile(r'^pgfast was started as root and there is no "nosuchuser" account'),
                 hint=ANY)


# ---------------------------------------------------------------- stopping

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_clean_stop(tls_cluster, pgfast_factory, signum):
    server = pgfast_factory(tls_cluster)
    postmaster = pid_file_pid(tls_cluster)
    private_dir = pid_file_lines(tls_cluster)[4]
    assert not port_is_free(server.port) and postgres_processes(tls_cluster)   # the checks below can fail
    server.process.send_signal(signum)
    assert server.process.wait(30) == 0, server.log
    server.wait_for("LOG:  database system is shut down")
    assert not alive(postmaster)
    assert not os.path.exists(os.path.join(tls_cluster, "postmaster.pid"))
    assert not os.path.exists(private_dir)
    assert_nothing_left(tls_cluster, server.port, server.socket_dir, grace=0)
    assert "FATAL" not in server.log


def test_postmaster_death_stops_pgfast(tls_cluster, pgfast_factory):
    server = pgfast_factory(tls_cluster)
    os.kill(pid_file_pid(tls_cluster), signal.SIGQUIT)
    try:
        status = server.process.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"pgfast did not notice its PostgreSQL exit:\n{server.log}")
    assert status != 0
    server.wait_for("PostgreSQL exited unexpectedly")
    assert_nothing_left(tls_cluster, server.port, server.socket_dir)


# ---------------------------------------------------------------- pgfast init

def non_comment_lines(path: str) -> list[str]:
    with open(path) as f:
        return [line.split("#", 1)[0].strip() for line in f if line.split("#", 1)[0].strip()]


def printed_connection_string(output: str, port: int | None = None) -> str:
    match = re.search(r'psql "([^"]+)"', output)
    assert match, output
    dsn = match[1]
    return dsn.replace("port=5432", f"port={port}") if port is not None else dsn


def test_init_prints_connection_string(initialised):
    data_dir, run = initialised
    dsn = printed_connection_string(run.output)
    assert dsn == (f"host=localhost port=5432 dbname=postgres user={db_account().pw_name} "
                   f"sslmode=verify-full sslrootcert={data_dir}/server.crt")
    assert "FATAL" not in run.output


def test_init_writes_tls_first_files(initialised):
    data_dir, _ = initialised
    account = db_account()
    key = os.stat(os.path.join(data_dir, "server.key"))
    assert stat.S_IMODE(key.st_mode) == 0o600
    assert (key.st_uid, key.st_gid) == (account.pw_uid, account.pw_gid)
    with open(os.path.join(data_dir, "server.key"), "rb") as f:
        assert isinstance(serialization.load_pem_private_key(f.read(), None), ec.EllipticCurvePrivateKey)
    with open(os.path.join(data_dir, "server.crt"), "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    settings = [line.replace(" ", "") for line in non_comment_lines(os.path.join(data_dir, "postgresql.conf"))]
    assert "ssl=on" in settings
    hba = [line.split() for line in non_comment_lines(os.path.join(data_dir, "pg_hba.conf"))]
    assert {fields[0] for fields in hba} == {"local", "hostssl"}      # TCP only over TLS
    assert any(fields[0] == "hostssl" for fields in hba)


def test_init_then_run_serves_the_printed_connection_string(initialised, served, bindir, module_env):
    _, run = initialised
    assert_tls_query(bindir, printed_connection_string(run.output, served.port), module_env)


def test_init_key_type_rsa(module_dir):
    data_dir = os.path.join(module_dir, "init-rsa")
    run = pgfast_cli("init", "-D", data_dir, "--key-type", "rsa", timeout=60)
    assert run.returncode == 0, run.output
    with open(os.path.join(data_dir, "server.key"), "rb") as f:
        key = serialization.load_pem_private_key(f.read(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    with open(os.path.join(data_dir, "server.crt"), "rb") as f:
        assert isinstance(x509.load_pem_x509_certificate(f.read()).public_key(), rsa.RSAPublicKey)


def test_init_key_passphrase_file_encrypts_the_key(encrypted):
    with open(os.path.join(encrypted, "server.key"), "rb") as f:
        pem = f.read()
    assert b"ENCRYPTED" in pem.splitlines()[0]
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(pem, None)
    serialization.load_pem_private_key(pem, PASSPHRASE.encode())
    st = os.stat(os.path.join(encrypted, "server.key"))
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == db_account().pw_uid


def test_init_refuses_a_non_empty_directory(scratch):
    data_dir = os.path.join(scratch, "full")
    os.mkdir(data_dir)
    with open(os.path.join(data_dir, "keep.txt"), "w") as f:
        f.write("precious\n")
    run = pgfast_cli("init", "-D", data_dir)
    assert run.returncode == 1, run.output
    assert_one_fatal(run.output, f'directory "{data_dir}" exists but is not empty', hint=ANY)
    assert os.listdir(data_dir) == ["keep.txt"]


def test_init_superuser_name(scratch, client_env, servers, bindir):
    data_dir = os.path.join(scratch, "data")
    run = pgfast_cli("init", "-D", data_dir, "-U", "alice", timeout=60)
    assert run.returncode == 0, run.output
    dsn = printed_connection_string(run.output)
    assert "user=alice" in dsn
    server = start_server(data_dir, scratch, client_env)
    servers.append(server)
    server.start()
    result = psql(bindir, printed_connection_string(run.output, server.port),
                  "SELECT current_user || ' ' || rolsuper FROM pg_roles WHERE rolname = current_user", client_env)
    assert result.returncode == 0, result.stderr + server.log
    assert result.stdout.strip() == "alice true"
    # init names the superuser in pgfast.console_users: the admin console works at once
    console = psql(bindir, printed_connection_string(run.output, server.port).replace("dbname=postgres", "dbname=pgfast"),
                   "SHOW VERSION", client_env)
    assert console.returncode == 0 and console.stdout.startswith("pgfast "), console.stderr
    assert server.stop() == 0


@pytest.mark.parametrize("state", ["missing", "empty"])
def test_run_initialises_a_missing_or_empty_directory(state, scratch, client_env, servers, bindir):
    data_dir = os.path.join(scratch, "data")
    if state == "empty":
        os.mkdir(data_dir, 0o755)
    server = start_server(data_dir, scratch, client_env)
    servers.append(server)
    server.start()
    assert os.path.isfile(os.path.join(data_dir, "PG_VERSION"))
    dsn = printed_connection_string(server.log)
    assert f"port={server.port}" in dsn
    assert_tls_query(bindir, dsn, client_env)
    assert server.stop() == 0


# ---------------------------------------------------------------- while running

def process_ids(status_path: str, field: str) -> list[int]:
    with open(status_path) as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return [int(n) for n in line.split()[1:]]


def test_pgfast_runs_as_the_database_account(served):
    account = db_account()
    assert process_ids(f"/proc/{served.process.pid}/status", "Uid") == [account.pw_uid] * 4
    assert process_ids(f"/proc/{served.process.pid}/status", "Gid") == [account.pw_gid] * 4


def _listening_tcp_inodes() -> dict[int, int]:
    """socket inode -> port of every listening TCP socket (IPv4 and IPv6)."""
    inodes = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.readlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A":                                  # LISTEN
                inodes[int(fields[9])] = int(fields[1].rsplit(":", 1)[1], 16)
    return inodes


def _socket_inodes(pid: int) -> set[int]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def test_postgresql_is_reachable_only_through_pgfast(served):
    listening = _listening_tcp_inodes()
    pgfast_ports = {listening[i] for i in _socket_inodes(served.process.pid) if i in listening}
    assert pgfast_ports == {served.port}
    postgres = postgres_processes(served.data_dir)
    assert pid_file_pid(served.data_dir) in postgres
    for pid in postgres:
        assert not _socket_inodes(pid) & listening.keys(), f"postgres process {pid} listens on TCP"
    assert pid_file_lines(served.data_dir)[5] == ""                # postmaster.pid: no listen address


def test_private_socket_directory_is_mode_0700(served):
    private_dir = pid_file_lines(served.data_dir)[4]
    assert private_dir != served.socket_dir
    st = os.stat(private_dir)
    assert stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_uid == db_account().pw_uid
    assert os.path.exists(os.path.join(private_dir, f".s.PGSQL.{served.port}"))


def psql_as_database_account(bindir: str, server: Pgfast, user: str, env: dict, password: str | None = None):
    """psql over the Unix socket, run as the operating-system account PostgreSQL runs as."""
    account = db_account()
    env = dict(env, **({"PGPASSWORD": password} if password else {}))
    return subprocess.run([os.path.join(bindir, "psql"), "-X", "-A", "-t", "-h", server.socket_dir,
                           "-p", str(server.port), "-U", user, "-d", "postgres", "-c", "SELECT 'local ' || current_user"],
                          capture_output=True, text=True, timeout=30, env=env, stdin=subprocess.DEVNULL, cwd="/",
                          **({"user": account.pw_uid, "group": account.pw_gid} if AS_ROOT else {}))


@pytest.mark.parametrize("auth", ["trust", "cert", "password", "md5", "scram-sha-256"])
def test_init_writes_a_directory_that_runs_for_every_auth(auth, scratch, client_env, servers, bindir):
    data_dir = os.path.join(scratch, "data")
    password = "init-secret"
    args = ["init", "-D", data_dir, "--auth", auth]
    if auth not in ("trust", "cert"):
        args += ["--pwfile", write_file(os.path.join(scratch, "pw"), password + "\n", 0o644)]
    run = pgfast_cli(*args, timeout=60)
    assert run.returncode == 0, run.output
    hba = [line.split() for line in non_comment_lines(os.path.join(data_dir, "pg_hba.conf"))]
    assert {fields[-1] for fields in hba if fields[0] == "local"} == {"peer" if auth == "cert" else auth}
    server = start_server(data_dir, scratch, client_env)
    servers.append(server)
    server.start()
    superuser = db_account().pw_name
    local = psql_as_database_account(bindir, server, superuser, client_env,
                                     password if auth not in ("trust", "cert") else None)
    assert local.returncode == 0, local.stderr + server.log
    assert local.stdout.strip() == f"local {superuser}"
    dsn = printed_connection_string(run.output, server.port)
    if auth == "cert":
        # no CA yet: pg_hba's cert line says so, in PostgreSQL's words (init's report says what to add)
        assert "root.crt" in run.output
        refused = psql(bindir, dsn, "SELECT 1", client_env)
        assert "client certificates can only be checked if a root certificate store is available" in refused.stderr
    else:
        assert_tls_query(bindir, dsn, dict(client_env, PGPASSWORD=password))
    assert server.stop() == 0


@requires_root
def test_peer_refuses_another_operating_system_user(scratch, client_env, servers, bindir):
    data_dir = os.path.join(scratch, "data")
    assert pgfast_cli("init", "-D", data_dir, "--auth", "cert", timeout=60).returncode == 0
    server = start_server(data_dir, scratch, client_env)
    servers.append(server)
    server.start()
    as_root = subprocess.run([os.path.join(bindir, "psql"), "-X", "-h", server.socket_dir, "-p", str(server.port),
                              "-U", db_account().pw_name, "-d", "postgres", "-c", "SELECT 1"],
                             capture_output=True, text=True, timeout=30, env=client_env, stdin=subprocess.DEVNULL)
    assert f'FATAL:  Peer authentication failed for user "{db_account().pw_name}"' in as_root.stderr
    server.wait_for(f"LOG:  provided user name ({db_account().pw_name}) and authenticated user name (root) do not match")
    assert server.stop() == 0
