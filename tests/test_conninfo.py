"""pgfast.conninfo against libpq's fe-connect.c (PostgreSQL 18): conninfo_parse,
conninfo_uri_parse_options, pqConnectOptions2 and passwordFromFile, with libpq's messages.
Pure unit tests: no server.
"""
import os

import pytest

from pgfast.conninfo import (ConninfoError, Host, check_passfile_permissions, parse,
                             password_for, read_passfile)


def error(conninfo, **kw):
    with pytest.raises(ConninfoError) as info:
        parse(conninfo, **kw)
    return str(info.value)


# --- keyword=value form ---------------------------------------------------------------

def test_multi_host_keyword_form(tmp_path):
    up = parse("host=db1,db2,db3 port=5432 sslmode=verify-full sslrootcert=ca.crt", base_dir=str(tmp_path))
    assert up.hosts == (Host("db1", 5432), Host("db2", 5432), Host("db3", 5432))
    assert up.sslmode == "verify-full"
    assert up.sslrootcert == str(tmp_path / "ca.crt")


@pytest.mark.parametrize("conninfo, keyword, value", [
    ("host = db  port=  6432", "port", "6432"),                    # whitespace around "="
    ("host=db\tapplication_name =\n'my app'", "application_name", "my app"),
    (r"host=db password='it\'s \\ here'", "password", "it's \\ here"),
    (r"host=db application_name=a\ b", "application_name", "a b"),  # escaped space, unquoted
    (r"host=db application_name=a\\b", "application_name", "a\\b"),
    (r"host=db application_name=ab\ ", "application_name", "ab "),
    ("host=db application_name=it's", "application_name", "it's"),  # a quote inside a bare value
    ("host=db application_name=''", "application_name", ""),
    ("host=db application_name=", "application_name", ""),
    ("host=db dbname= user=u", "dbname", "user=u"),                 # libpq skips blanks after "="
    ("host=a host=db", "host", "db"),                               # the last one wins
    ("host=db requiressl=1", "sslmode", "require"),
    ("host=db requiressl=0", "sslmode", "prefer"),
])
def test_keyword_values(conninfo, keyword, value):
    assert parse(conninfo).options[keyword] == value


def test_defaults_are_in_options():
    options = parse("host=db").options
    assert options["port"] == "5432"
    assert options["sslmode"] == "verify-full"
    assert options["target_session_attrs"] == "any"
    assert options["load_balance_hosts"] == "disable"
    assert options["ssl_min_protocol_version"] == "TLSv1.2"
    assert "password" not in options and "connect_timeout" not in options


def test_typed_views_and_defaults():
    up = parse("host=db")
    assert (up.sslmode, up.sslsni, up.target_session_attrs, up.connect_timeout) == ("verify-full", True, "any", None)
    assert (up.dbname, up.application_name, up.sslcert, up.sslkey, up.sslcrl) == (None,) * 5
    up = parse("host=db dbname=app user=alice application_name=pgfast sslsni=0 target_session_attrs=read-write")
    assert (up.dbname, up.options["user"], up.application_name) == ("app", "alice", "pgfast")
    assert up.sslsni is False and up.target_session_attrs == "read-write"
    assert parse("host=db dbname=''").dbname is None


@pytest.mark.parametrize("value, enabled", [("1", True), ("0", False), ("true", False), ("10", True)])
def test_sslsni_follows_libpq_first_character_test(value, enabled):
    assert parse(f"host=db sslsni={value}").sslsni is enabled


@pytest.mark.parametrize("value, seconds", [
    ("0", None), ("-5", None), ("1", 2.0), ("2", 2.0), ("10", 10.0), (" 7 ", 7.0), ("+3", 3.0),
])
def test_connect_timeout(value, seconds):
    assert parse(f"host=db connect_timeout='{value}'").connect_timeout == seconds


def test_sslrootcert_system_defaults_to_verify_full_and_is_not_a_file(tmp_path):
    up = parse("host=db sslrootcert=system", base_dir=str(tmp_path))
    assert up.sslmode == "verify-full" and up.sslrootcert == "system"


def test_relative_files_resolve_against_base_dir(tmp_path):
    base = str(tmp_path)
    up = parse("host=db sslcert=c.crt sslkey=sub/c.key sslcrl=/abs/crl.pem sslcrldir=crls passfile=pgpass "
               "sslrootcert=ca.crt", base_dir=base)
    assert up.sslcert == os.path.join(base, "c.crt")
    assert up.sslkey == os.path.join(base, "sub/c.key")
    assert up.sslcrl == "/abs/crl.pem"
    assert up.options["sslcrldir"] == os.path.join(base, "crls")
    assert up.options["passfile"] == os.path.join(base, "pgpass")
    assert parse("host=db sslcert=c.crt").sslcert == "c.crt"       # no base_dir: left alone


@pytest.mark.parametrize("conninfo, hosts", [
    ("host=a,b,c port=5432,,5434", (Host("a", 5432), Host("b", 5432), Host("c", 5434))),
    ("host=a,b port=6432", (Host("a", 6432), Host("b", 6432))),
    ("host=a port=''", (Host("a", 5432),)),
    ("host=/var/run/postgresql port=5433", (Host("/var/run/postgresql", 5433),)),
    ("host=a,b hostaddr=10.0.0.1,::1", (Host("a", 5432, "10.0.0.1"), Host("b", 5432, "::1"))),
    ("hostaddr=10.0.0.1 sslmode=require", (Host("10.0.0.1", 5432, "10.0.0.1"),)),
    ("host=a,b,c port=' 1 ,2,3'", (Host("a", 1), Host("b", 2), Host("c", 3))),
])
def test_hosts(conninfo, hosts):
    assert parse(conninfo).hosts == hosts


# --- URI form -------------------------------------------------------------------------

def test_uri_multi_host():
    up = parse("postgresql://user@host1:5432,host2:5433/dbname?sslmode=verify-full")
    assert up.hosts == (Host("host1", 5432), Host("host2", 5433))
    assert (up.options["user"], up.dbname, up.sslmode) == ("user", "dbname", "verify-full")


@pytest.mark.parametrize("uri, expected", [
    ("postgres://h/db", {"host": "h", "dbname": "db"}),
    ("postgresql://u:p%40ss@[::1]:6543,[fe80::1]/d%20b?application_name=x%2Fy",
     {"user": "u", "password": "p@ss", "host": "::1,fe80::1", "port": "6543,", "dbname": "d b",
      "application_name": "x/y"}),
    ("postgresql://h1,h2:5433/db", {"host": "h1,h2", "port": ",5433"}),
    ("postgresql://h?ssl=true", {"sslmode": "require"}),
    ("postgresql://h?ssl=true&sslmode=verify-ca", {"sslmode": "verify-ca"}),
    ("postgresql://h/?requiressl=1", {"sslmode": "require"}),
    ("postgresql:///db?host=%2Fvar%2Frun%2Fpostgresql&port=5433",
     {"host": "/var/run/postgresql", "port": "5433", "dbname": "db"}),
    ("postgresql://:secret@h", {"password": "secret"}),
    ("postgresql://h/db?application_name=caf%C3%A9", {"application_name": "café"}),
    ("postgresql://h/db?application_name=%20a%20&", {"application_name": " a "}),
    ("postgresql://h/db?application_name= a ", {"application_name": "a"}),   # outer spaces dropped
    ("postgresql://h/db?target_session_attrs=primary&load_balance_hosts=random",
     {"target_session_attrs": "primary", "load_balance_hosts": "random"}),
])
def test_uri_options(uri, expected):
    options = parse(uri).options
    assert {k: options.get(k) for k in expected} == expected


def test_uri_without_dbname_leaves_it_unset():
    up = parse("postgresql://u@h/")
    assert up.dbname is None and "dbname" not in up.options
    assert up.hosts == (Host("h", 5432),)


def test_uri_ipv6_hosts():
    assert parse("postgresql://[::1]:6000,[2001:db8::2]/d").hosts == (Host("::1", 6000), Host("2001:db8::2", 5432))


# --- errors, with libpq's messages ----------------------------------------------------

@pytest.mark.parametrize("conninfo, message", [
    ("host", 'missing "=" after "host" in connection info string'),
    ("host=a foo", 'missing "=" after "foo" in connection info string'),
    ("host=a 'x'", 'missing "=" after "\'x\'" in connection info string'),
    ("host='abc", "unterminated quoted string in connection info string"),
    (r"host='abc\'", "unterminated quoted string in connection info string"),
    ("host=a x=1", 'invalid connection option "x"'),
    ("host=a =1", 'invalid connection option ""'),
    ("host=a service=prod", 'invalid connection option "service"'),
    ("host=a sslmode=bogus", 'invalid sslmode value: "bogus"'),
    ("host=a sslmode=Require", 'invalid sslmode value: "Require"'),
    ("host=a target_session_attrs=master", 'invalid target_session_attrs value: "master"'),
    ("host=a load_balance_hosts=roundrobin", 'invalid load_balance_hosts value: "roundrobin"'),
    ("host=a channel_binding=maybe", 'invalid channel_binding value: "maybe"'),
    ("host=a gssencmode=always", 'invalid gssencmode value: "always"'),
    ("host=a gssencmode=require", 'gssencmode value "require" invalid when GSSAPI support is not compiled in'),
    ("host=a sslnegotiation=tls", 'invalid sslnegotiation value: "tls"'),
    ("host=a sslnegotiation=direct sslmode=prefer",
     'weak sslmode "prefer" may not be used with sslnegotiation=direct (use "require", "verify-ca", or "verify-full")'),
    ("host=a sslrootcert=system sslmode=require",
     'weak sslmode "require" may not be used with sslrootcert=system (use "verify-full")'),
    ("host=a ssl_min_protocol_version=TLSv9", 'invalid "ssl_min_protocol_version" value: "TLSv9"'),
    ("host=a ssl_max_protocol_version=SSLv3", 'invalid "ssl_max_protocol_version" value: "SSLv3"'),
    ("host=a ssl_min_protocol_version=TLSv1.3 ssl_max_protocol_version=tlsv1.2", "invalid SSL protocol version range"),
    ("host=a ssl_min_protocol_version=TLSv1.1 ssl_max_protocol_version=TLSv1", "invalid SSL protocol version range"),
    ("host=a connect_timeout=abc", 'invalid integer value "abc" for connection option "connect_timeout"'),
    ("host=a connect_timeout=", 'invalid integer value "" for connection option "connect_timeout"'),
    ("host=a keepalives=yes", 'invalid integer value "yes" for connection option "keepalives"'),
    ("host=a keepalives_idle=1.5", 'invalid integer value "1.5" for connection option "keepalives_idle"'),
    ("host=a keepalives_interval=0x10", 'invalid integer value "0x10" for connection option "keepalives_interval"'),
    ("host=a keepalives_count=1_0", 'invalid integer value "1_0" for connection option "keepalives_count"'),
    ("host=a tcp_user_timeout=2147483648",
     'invalid integer value "2147483648" for connection option "tcp_user_timeout"'),
    ("host=a port=abc", 'invalid integer value "abc" for connection option "port"'),
    ("host=a port=70000", 'invalid port number: "70000"'),
    ("host=a port=0", 'invalid port number: "0"'),
    ("host=a,b,c port=1,2", "could not match 2 port numbers to 3 hosts"),
    ("host=a port=1,2", "could not match 2 port numbers to 1 hosts"),
    ("host=a,b hostaddr=10.0.0.1", "could not match 2 host names to 1 hostaddr values"),
    ("host=a hostaddr=10.0.0.1,10.0.0.2", "could not match 1 host names to 2 hostaddr values"),
    ("hostaddr=10.0.0.1", "host name must be specified for a verified SSL connection"),
    ("", "pgfast.upstream names no host"),
    ("port=5432 dbname=x", "pgfast.upstream names no host"),
    ("host=a,,b", "pgfast.upstream names no host"),
    ("host=''", "pgfast.upstream names no host"),
    ("postgresql:///db", "pgfast.upstream names no host"),
    ("postgresql://h1,/db", "pgfast.upstream names no host"),
    # require_auth
    ("host=a require_auth=password,!md5",
     'negative require_auth method "!md5" cannot be mixed with non-negative methods'),
    ("host=a require_auth=!md5,password", 'require_auth method "password" cannot be mixed with negative methods'),
    ("host=a require_auth=kerberos", 'invalid require_auth value: "kerberos"'),
    ("host=a require_auth=!kerberos", 'invalid require_auth value: "kerberos"'),
    ("host=a require_auth=md5,md5", 'require_auth method "md5" is specified more than once'),
    ("host=a require_auth=!md5,!md5", 'require_auth method "!md5" is specified more than once'),
    ("host=a require_auth=none,none", 'require_auth method "none" is specified more than once'),
    ("host=a require_auth=!none,!none", 'require_auth method "!none" is specified more than once'),
    ("host=a require_auth=md5,", 'invalid require_auth value: ""'),
    # URI
    ("postgresql://[::1", 'end of string reached when looking for matching "]" in IPv6 host address in URI: '
                          '"postgresql://[::1"'),
    ("postgresql://[]/db", 'IPv6 host address may not be empty in URI: "postgresql://[]/db"'),
    ("postgresql://[::1]x/db",
     'unexpected character "x" at position 19 in URI (expected ":" or "/"): "postgresql://[::1]x/db"'),
    ("postgresql://h/db?sslmode", 'missing key/value separator "=" in URI query parameter: "sslmode"'),
    ("postgresql://h/db?sslmode=require&&b=2", 'missing key/value separator "=" in URI query parameter: ""'),
    ("postgresql://h/db?a=b=c", 'extra key/value separator "=" in URI query parameter: "a"'),
    ("postgresql://h/db?foo=1", 'invalid URI query parameter: "foo"'),
    ("postgresql://h/db?ssl=1", 'invalid URI query parameter: "ssl"'),     # only ssl=true is mapped
    ("postgresql://h/db?ssl=false", 'invalid URI query parameter: "ssl"'),
    ("postgresql://h/d%zz", 'invalid percent-encoded token: "d%zz"'),
    ("postgresql://h/d%4", 'invalid percent-encoded token: "d%4"'),
    ("postgresql://h/d%00", 'forbidden value %00 in percent-encoded value: "d%00"'),
    ("postgresql://h/a b", 'unexpected spaces found in "a b", use percent-encoded spaces (%20) instead'),
    ("postgresql://h/db?sslmode=verify%2Dnone", 'invalid sslmode value: "verify-none"'),
    ("postgresql://h:x/db", 'invalid integer value "x" for connection option "port"'),
])
def test_errors(conninfo, message):
    assert error(conninfo) == message


def test_hostaddr_must_be_numeric():
    message = error("host=a hostaddr=db.example.com")
    assert message.startswith('could not parse network address "db.example.com": ')


@pytest.mark.parametrize("value", ["password,md5", "!password,!md5", "gss,sspi", "!gss,!sspi", "none,scram-sha-256",
                                   "!none,!password"])
def test_require_auth_accepted(value):
    assert parse(f"host=a require_auth={value}").options["require_auth"] == value


# --- describe -------------------------------------------------------------------------

@pytest.mark.parametrize("conninfo, described", [
    ("host=db password=secret user=u", "host=db password=******** user=u"),
    ("host=db password='se cret' sslpassword=k", "host=db password=******** sslpassword=********"),
    ("password=a host=db password=b", "password=******** host=db password=********"),
    ("host=db password=", "host=db password="),
    ("postgresql://u:p%40ss@h/db", "postgresql://u:********@h/db"),
    ("postgresql://u@h/db?password=x&application_name=y", "postgresql://u@h/db?password=********&application_name=y"),
    ("postgresql://h/db?pass%77ord=x", "postgresql://h/db?pass%77ord=********"),
])
def test_describe_masks_passwords(conninfo, described):
    up = parse(conninfo)
    assert up.describe() == described
    assert "secret" not in repr(up) and "p%40ss" not in repr(up)


# --- the password file ----------------------------------------------------------------

def passfile(tmp_path, text, mode=0o600):
    path = tmp_path / "pgpass"
    path.write_bytes(text.encode())
    path.chmod(mode)
    return str(path)


PGPASS = "\n".join([
    "# a comment line: db1:5432:app:alice:nope",
    "db1:5432:app:alice:first",
    "db1:5432:app:alice:second",                  # the first match wins
    "db2:*:*:bob:wild",
    r"my\:host:5432:app:alice:pass\:word\\x",
    r"\*:5432:app:carol:literal-star",
    "*:*:*:carol:any-host",
    "localhost:5432:app:dave:local",
    "short:5432:app",                             # too few fields: never matches
    "db3:5432:app:erin:",                         # an empty password
    "db4:5432:app:frank:pw:ignored:fields",
    "db5:5432:app:gina:crlf\r",
    " db6:5432:app:hank:spaces-count",
    "",
])


@pytest.mark.parametrize("host, port, database, user, password", [
    ("db1", 5432, "app", "alice", "first"),
    ("db1", 5433, "app", "alice", None),
    ("db2", 6000, "other", "bob", "wild"),
    ("db2", 6000, "other", "bobby", None),
    ("my:host", 5432, "app", "alice", "pass:word\\x"),
    ("*", 5432, "app", "carol", "literal-star"),
    ("anything", 5432, "app", "carol", "any-host"),
    ("localhost", 5432, "app", "dave", "local"),
    ("", 5432, "app", "dave", "local"),                       # no host
    ("/tmp", 5432, "app", "dave", "local"),                   # DEFAULT_PGSOCKET_DIR
    ("/var/run/postgresql", 5432, "app", "dave", None),
    ("short", 5432, "app", "x", None),
    ("db3", 5432, "app", "erin", ""),
    ("db4", 5432, "app", "frank", "pw"),
    ("db5", 5432, "app", "gina", "crlf"),
    (" db6", 5432, "app", "hank", "spaces-count"),
    ("db1", 5432, "", "alice", None),                         # libpq needs a database and a user
    ("db2", 5432, "x", "", None),
])
def test_password_for(tmp_path, host, port, database, user, password):
    entries = read_passfile(passfile(tmp_path, PGPASS))
    assert password_for(entries, host, port, database, user) == password


def test_read_passfile_entries(tmp_path):
    entries = read_passfile(passfile(tmp_path, "# c\nh:1:d:u:p\\:w\r\n*:*:*:*:x\nbad line\n\\*:1:d:u:y"))
    assert entries == [("h", "1", "d", "u", "p:w"), ("*", "*", "*", "*", "x"), ("\\*", "1", "d", "u", "y")]


def test_read_passfile_trailing_backslash_stays(tmp_path):
    assert read_passfile(passfile(tmp_path, "h:1:d:u:pw\\\n")) == [("h", "1", "d", "u", "pw\\")]


def test_read_passfile_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_passfile(str(tmp_path / "absent"))


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700, 0o000])
def test_passfile_permissions_accepted(tmp_path, mode):
    check_passfile_permissions(passfile(tmp_path, "h:1:d:u:p\n", mode))


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o610, 0o660, 0o644, 0o601, 0o666])
def test_passfile_permissions_refused(tmp_path, mode):
    path = passfile(tmp_path, "h:1:d:u:p\n", mode)
    with pytest.raises(ConninfoError) as info:
        check_passfile_permissions(path)
    assert str(info.value) == (f'password file "{path}" has group or world access; '
                               'permissions should be u=rw (0600) or less')


def test_passfile_not_a_plain_file(tmp_path):
    with pytest.raises(ConninfoError) as info:
        check_passfile_permissions(str(tmp_path))
    assert str(info.value) == f'password file "{tmp_path}" is not a plain file'


def test_passfile_permissions_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        check_passfile_permissions(str(tmp_path / "absent"))
