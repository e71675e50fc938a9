"""pgfast.config against PostgreSQL 15's rules for postgresql.conf and -c.

Most tests run without PostgreSQL; the ones marked by the `pgbin` fixture use the real
`postgres --describe-config`, and test_same_answer_as_postgres compares with `postgres -C`.
"""
import os
import shutil
import subprocess

import pytest

from pgfast import config
from pgfast.config import describe_config, load
from pgfast.errors import ConfigError

TIME_HINT = 'Valid units for this parameter are "us", "ms", "s", "min", "h", and "d".'


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def load_conf(tmp_path, content, overrides=(), known=None):
    write(tmp_path / "postgresql.conf", content)
    return load(str(tmp_path), overrides, known)


def conf_error(tmp_path, content, overrides=(), known=None):
    with pytest.raises(ConfigError) as caught:
        load_conf(tmp_path, content, overrides, known)
    return caught.value


def where(tmp_path, line, name="postgresql.conf"):
    return f' in file "{tmp_path / name}" line {line}'


@pytest.fixture(scope="module")
def pgbin():
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        pytest.skip("pg_config not found")
    bindir = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip()
    if not os.access(os.path.join(bindir, "postgres"), os.X_OK):
        pytest.skip(f"no postgres in {bindir}")
    return bindir


@pytest.fixture(scope="module")
def known(pgbin):
    return describe_config(pgbin)


# ---------------------------------------------------------------- syntax

def test_equals_sign_is_optional_and_names_ignore_case(tmp_path):
    s = load_conf(tmp_path, "port = 5433\nMax_Connections 7\nSSL=on\n")
    assert (s.port, s.max_connections, s.ssl) == (5433, 7, True)
    assert s.raw["max_connections"] == "7"


def test_comments_blank_lines_tabs_and_crlf(tmp_path):
    s = load_conf(tmp_path, "# header\n\n   \t# indented comment\r\n\tport\t=\t5499 # trailing\r\n\n")
    assert s.port == 5499


def test_unquoted_value_forms(tmp_path):
    s = load_conf(tmp_path, "a = -1.5\nb = 30s\nc = 8kB\nd = 1min\ne = foo/bar:baz-1.2\n"
                            "f = .\ng = 0x1F\nh = +3\ni = 1.5e-3\nj = on\nk = x.y.z\n")
    assert {k: s.raw[k] for k in "abcdefghijk"} == {
        "a": "-1.5", "b": "30s", "c": "8kB", "d": "1min", "e": "foo/bar:baz-1.2", "f": ".",
        "g": "0x1F", "h": "+3", "i": "1.5e-3", "j": "on", "k": "x.y.z"}


def test_quoted_strings_and_escapes(tmp_path):
    content = (rb"a = 'it''s'" b"\n"
               rb"b = 'q\'q \\ \n \t \b \f \r'" b"\n"
               rb"c = '\101\1012\60'" b"\n"
               rb"d = '\q\z'" b"\n"
               rb"e = '\303\251 and caf" b"\xc3\xa9'\n"
               rb"f = 'cut\0here'" b"\n"
               rb"g = ''" b"\n"
               rb"h = '# not a comment'" b"\n")
    s = load_conf(tmp_path, content)
    assert s.raw["a"] == "it's"
    assert s.raw["b"] == "q'q \\ \n \t \b \f \r"
    assert s.raw["c"] == "AA20"
    assert s.raw["d"] == "qz"
    assert s.raw["e"] == "\u00e9 and caf\u00e9"
    assert s.raw["f"] == "cut"          # PostgreSQL keeps a C string
    assert s.raw["g"] == ""
    assert s.raw["h"] == "# not a comment"


def test_octal_escape_is_one_byte(tmp_path):
    s = load_conf(tmp_path, rb"a = '\777'" b"\n")
    assert os.fsencode(s.raw["a"]) == b"\xff"


@pytest.mark.parametrize("content, line, near", [
    ("port =\n", 1, None),
    ("\nport\n", 2, None),
    ("port = 5433 junk\n", 1, "junk"),
    ("5433\n", 1, "5433"),
    ("port = = 1\n", 1, "="),
    ("ssl_ciphers = 'abc\n", 1, "'"),
    ("a.b.c = 1\n", 1, "a.b.c"),
    ("x = /tmp\n", 1, "/"),
    ("x = a.b\n", 1, "a.b"),                  # a qualified name is no value; a.b.c is
    ("port = 1e3\n", 1, "3"),                  # "1e" is an integer with unit "e"
    ("authentication_timeout = 1.5min\n", 1, "min"),  # must be quoted
    ("'port' = 1\n", 1, "'port'"),
    ("ok = 1\n\n# c\nport 1 2\n", 4, "2"),
])
def test_syntax_errors(tmp_path, content, line, near):
    e = conf_error(tmp_path, content)
    tail = "near end of line" if near is None else f'near token "{near}"'
    assert e.message == f'syntax error in file "{tmp_path / "postgresql.conf"}" line {line}, {tail}'


def test_syntax_error_at_end_of_file_without_newline_names_previous_line(tmp_path):
    # PostgreSQL's own off-by-one: it has not counted the last line yet.
    e = conf_error(tmp_path, "port = 1\nport =")
    assert e.message == f'syntax error in file "{tmp_path / "postgresql.conf"}" line 1, near end of line'


def test_last_line_without_newline_is_read(tmp_path):
    assert load_conf(tmp_path, "port = 1\nport = 2").port == 2


# ---------------------------------------------------------------- includes

def test_include_is_relative_to_including_file(tmp_path):
    write(tmp_path / "sub" / "a.conf", "port = 1111\ninclude 'b.conf'\n")
    write(tmp_path / "sub" / "b.conf", "max_connections = 7\n")
    s = load_conf(tmp_path, "include 'sub/a.conf'\n")
    assert (s.port, s.max_connections) == (1111, 7)


def test_include_absolute_path_and_directive_spellings(tmp_path):
    other = write(tmp_path / "elsewhere" / "x.conf", "port = 2222\n")
    write(tmp_path / "sub" / "y.conf", "max_connections = 9\n")
    s = load_conf(tmp_path, f"INCLUDE = '{other}'\ninclude sub/y.conf\n")
    assert (s.port, s.max_connections) == (2222, 9)


def test_include_is_read_in_place(tmp_path):
    write(tmp_path / "inc.conf", "port = 2\n")
    assert load_conf(tmp_path, "port = 1\ninclude 'inc.conf'\n").port == 2
    assert load_conf(tmp_path, "include 'inc.conf'\nport = 3\n").port == 3


def test_missing_include_is_an_error(tmp_path):
    e = conf_error(tmp_path, "include 'sub/../nope.conf'\n")
    assert e.message == f'could not open configuration file "{tmp_path / "nope.conf"}": No such file or directory'


def test_include_if_exists_skips_missing_file_with_log(tmp_path, capfd):
    write(tmp_path / "there.conf", "port = 4321\n")
    s = load_conf(tmp_path, "include_if_exists 'gone.conf'\ninclude_if_exists 'there.conf'\n")
    assert s.port == 4321
    assert f'LOG:  skipping missing configuration file "{tmp_path / "gone.conf"}"' in capfd.readouterr().err


def test_include_dir_order_and_filter(tmp_path):
    d = tmp_path / "conf.d"
    write(d / "9.conf", "port = 9\n")
    write(d / "10.conf", "port = 10\nmax_connections = 10\n")
    write(d / "B.conf", "max_connections = 66\n")
    write(d / "a.conf", "max_connections = 97\n")       # 'B' < 'a' in C order: a.conf wins
    write(d / ".hidden.conf", "port = 1\n")
    write(d / "backup.conf~", "port = 2\n")
    write(d / "notes.txt", "port = 3\n")
    (d / "dir.conf").mkdir()
    s = load_conf(tmp_path, "include_dir 'conf.d'\n")
    assert (s.port, s.max_connections) == (9, 97)


def test_include_dir_relative_to_included_file(tmp_path):
    write(tmp_path / "etc" / "main.conf", "include_dir 'more'\n")
    write(tmp_path / "etc" / "more" / "p.conf", "port = 7000\n")
    assert load_conf(tmp_path, "include 'etc/main.conf'\n").port == 7000


def test_include_dir_errors(tmp_path):
    e = conf_error(tmp_path, "include_dir 'nodir'\n")
    assert e.message == f'could not open configuration directory "{tmp_path / "nodir"}": No such file or directory'
    (tmp_path / "d").mkdir()
    os.symlink(tmp_path / "missing", tmp_path / "d" / "z.conf")
    e = conf_error(tmp_path, "include_dir 'd'\n")
    assert e.message == f'could not stat file "{tmp_path / "d" / "z.conf"}": No such file or directory'


def test_empty_include_names(tmp_path):
    assert conf_error(tmp_path, "include ''\n").message == 'empty configuration file name: ""'
    assert conf_error(tmp_path, "include_dir ' '\n").message == 'empty configuration directory name: " "'


def test_include_of_itself_and_of_a_directory(tmp_path):
    conf = tmp_path / "postgresql.conf"
    assert conf_error(tmp_path, "include 'postgresql.conf'\n").message == \
        f'configuration file recursion in "{conf}"'
    (tmp_path / "d").mkdir()
    assert conf_error(tmp_path, "include_if_exists 'd'\n").message == \
        f'input in flex scanner failed at file "{tmp_path / "d"}" line 1'


def test_nesting_depth(tmp_path):
    for i in range(1, 10):
        write(tmp_path / f"f{i}", f"include 'f{i + 1}'\n")
    write(tmp_path / "f10", "port = 1234\n")
    assert load_conf(tmp_path, "include 'f1'\n").port == 1234     # ten levels deep is allowed
    write(tmp_path / "f10", "include 'f11'\n")
    write(tmp_path / "f11", "port = 1\n")
    e = conf_error(tmp_path, "include 'f1'\n")
    assert e.message == 'could not open configuration file "f11": maximum nesting depth exceeded'


def test_error_in_included_file_names_that_file(tmp_path):
    write(tmp_path / "inc.conf", "\nport = x\n")
    e = conf_error(tmp_path, "include 'inc.conf'\n")
    assert e.message == f'invalid value for parameter "port": "x"{where(tmp_path, 2, "inc.conf")}'


# ---------------------------------------------------------------- data directory and auto.conf

def test_auto_conf_is_read_after_postgresql_conf(tmp_path):
    write(tmp_path / "postgresql.auto.conf", "port = 6000\n")
    assert load_conf(tmp_path, "port = 5000\nmax_connections = 5\n").port == 6000


def test_missing_auto_conf_is_logged_like_postgresql(tmp_path, capfd):
    load_conf(tmp_path, "")
    assert f'skipping missing configuration file "{tmp_path / "postgresql.auto.conf"}"' in capfd.readouterr().err


def test_missing_postgresql_conf(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load(str(tmp_path))
    assert caught.value.message == ('could not access the server configuration file '
                                    f'"{tmp_path / "postgresql.conf"}": No such file or directory')


def test_missing_data_directory(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load(str(tmp_path / "nope"))
    assert caught.value.message == f'could not access directory "{tmp_path / "nope"}": No such file or directory'
    assert caught.value.hint == "Run initdb or pg_basebackup to initialize a PostgreSQL data directory."


def test_relative_data_directory_becomes_absolute(tmp_path, monkeypatch):
    write(tmp_path / "data" / "postgresql.conf", "")
    monkeypatch.chdir(tmp_path)
    s = load("data/")
    assert s.data_dir == str(tmp_path / "data")
    assert s.hba_file == str(tmp_path / "data" / "pg_hba.conf")


# ---------------------------------------------------------------- precedence

def test_last_setting_wins_and_c_wins(tmp_path):
    write(tmp_path / "postgresql.auto.conf", "port = 3\n")
    s = load_conf(tmp_path, "port = 1\nport = 2\n", [("port", "4"), ("PORT", "5")])
    assert s.port == 5
    assert s.raw["port"] == "5"


def test_earlier_bad_value_is_ignored_only_when_spelled_identically(tmp_path):
    assert load_conf(tmp_path, "port = abc\nport = 1\n").port == 1
    e = conf_error(tmp_path, "PORT = abc\nport = 1\n")
    assert e.message == f'invalid value for parameter "PORT": "abc"{where(tmp_path, 1)}'


def test_bad_file_value_is_an_error_even_when_c_overrides_it(tmp_path):
    e = conf_error(tmp_path, "port = abc\n", [("port", "5433")])
    assert e.message == f'invalid value for parameter "port": "abc"{where(tmp_path, 1)}'


def test_c_errors_come_before_file_errors(tmp_path):
    e = conf_error(tmp_path, "port = \n", [("port", "abc")])
    assert e.message == 'invalid value for parameter "port": "abc"'


def test_every_c_setting_but_pgfast_s_own_goes_to_postgresql_in_order(tmp_path):
    s = load_conf(tmp_path, "", [("shared_buffers", "1GB"), ("port", "6543"), ("pgfast.postgres_bin", "/x"),
                                 ("auto_explain.log_min_duration", "0"), ("Work_Mem", "4MB"),
                                 ("max_connections", "300"), ("authentication_timeout", "7s")])
    assert s.postgres_overrides == (("shared_buffers", "1GB"), ("port", "6543"), ("auto_explain.log_min_duration", "0"),
                                    ("Work_Mem", "4MB"), ("max_connections", "300"), ("authentication_timeout", "7s"))
    assert s.max_connections == 300 and s.authentication_timeout == 7
    assert s.port == 6543
    assert s.raw["work_mem"] == "4MB"


# ---------------------------------------------------------------- names

def test_unknown_names(tmp_path):
    known = {"port": "0", "shared_buffers": "1024"}
    assert load_conf(tmp_path, "shared_buffers = 1\n", known=known).raw["shared_buffers"] == "1"
    e = conf_error(tmp_path, "port = 1\n\nfoo = 1\n", known=known)
    assert e.message == f'unrecognized configuration parameter "foo"{where(tmp_path, 3)}'
    e = conf_error(tmp_path, "", [("Foo", "1")], known=known)
    assert e.message == 'unrecognized configuration parameter "Foo"'


def test_unknown_name_errors_come_after_syntax_errors(tmp_path):
    write(tmp_path / "postgresql.auto.conf", "port = \n")
    e = conf_error(tmp_path, "foo = 1\n", known={"port": "0"})
    assert e.message.startswith("syntax error")


def test_no_name_check_without_known(tmp_path):
    assert load_conf(tmp_path, "whatever = 1\n", [("anything", "2")]).raw["whatever"] == "1"


def test_dotted_names_are_placeholders(tmp_path):
    s = load_conf(tmp_path, "auto_explain.log_analyze = on\n", [("my.app.setting", "x")], known={})
    assert s.raw["auto_explain.log_analyze"] == "on"
    assert s.postgres_overrides == (("my.app.setting", "x"),)


@pytest.mark.parametrize("name", ["a..b", "a.1b", "a.", ".a", "a.b-c"])
def test_invalid_custom_names_from_c(tmp_path, name):
    e = conf_error(tmp_path, "", [(name, "1")])
    assert e.message == f'invalid configuration parameter name "{name}"'
    assert e.detail == "Custom parameter names must be two or more simple identifiers separated by dots."


PGFAST_DEFAULTS = {name: default for name, (_, default) in config.PGFAST_SETTINGS.items()}


def test_pgfast_settings(tmp_path):
    assert load_conf(tmp_path, "").pgfast == PGFAST_DEFAULTS
    s = load_conf(tmp_path, "PGFAST.Postgres_Bin = '/opt/pg/bin/postgres'\n")
    assert s.pgfast["pgfast.postgres_bin"] == "/opt/pg/bin/postgres"
    s = load_conf(tmp_path, "pgfast.postgres_bin = '/a'\n", [("pgfast.postgres_bin", "/b")])
    assert s.pgfast["pgfast.postgres_bin"] == "/b"
    assert s.postgres_overrides == ()


def test_unregistered_pgfast_setting_is_unknown(tmp_path):
    e = conf_error(tmp_path, "pgfast.postgres_bim = '/x'\n")
    assert e.message == f'unrecognized configuration parameter "pgfast.postgres_bim"{where(tmp_path, 1)}'
    e = conf_error(tmp_path, "", [("pgfast.nope", "1")])
    assert e.message == 'unrecognized configuration parameter "pgfast.nope"'


def test_registering_a_pgfast_setting_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(config.PGFAST_SETTINGS, "pgfast.flag", (config._boolean, False))
    assert load_conf(tmp_path, "").pgfast["pgfast.flag"] is False
    assert load_conf(tmp_path, "pgfast.flag = yes\n").pgfast["pgfast.flag"] is True
    e = conf_error(tmp_path, "pgfast.flag = maybe\n")
    assert e.message == f'parameter "pgfast.flag" requires a Boolean value{where(tmp_path, 1)}'


# ---------------------------------------------------------------- typed values

@pytest.mark.parametrize("value, expected", [
    ("on", True), ("off", False), ("of", False), ("true", True), ("T", True), ("tRu", True),
    ("false", False), ("f", False), ("yes", True), ("y", True), ("no", False), ("N", False),
    ("1", True), ("0", False), ("ON", True),
])
def test_booleans(tmp_path, value, expected):
    assert load_conf(tmp_path, f"ssl = '{value}'\n").ssl is expected


@pytest.mark.parametrize("value", ["o", "", "2", "10", "onn", "truee", " on", "enable"])
def test_bad_booleans(tmp_path, value):
    e = conf_error(tmp_path, f"ssl_prefer_server_ciphers = '{value}'\n")
    assert e.message == f'parameter "ssl_prefer_server_ciphers" requires a Boolean value{where(tmp_path, 1)}'
    e = conf_error(tmp_path, "", [("ssl", value)])
    assert e.message == 'parameter "ssl" requires a Boolean value'


@pytest.mark.parametrize("value, expected", [
    ("5433", 5433), ("0x1F90", 8080), ("'010'", 8), ("'5432 '", 5432), ("' 5432'", 5432),
    ("5432.5", 5432), ("5433.5", 5434), ("'1e3'", 1000), ("'0x1.8p12'", 6144), ("+80", 80),
])
def test_integers(tmp_path, value, expected):
    assert load_conf(tmp_path, f"port = {value}\n").port == expected


@pytest.mark.parametrize("value, hint", [
    ("abc", None), ("10s", None), ("''", None), ("'inf'", None), ("'08'", None), ("'-.5'", None),
    ("0x", None), ("'1e999'", None), ("99999999999", "Value exceeds integer range."),
])
def test_bad_integers(tmp_path, value, hint):
    e = conf_error(tmp_path, f"port = {value}\n")
    assert e.message == f'invalid value for parameter "port": "{value.strip(chr(39))}"{where(tmp_path, 1)}'
    assert e.hint == hint


def test_integer_ranges(tmp_path):
    e = conf_error(tmp_path, "port = 70000\n")
    assert e.message == f'70000 is outside the valid range for parameter "port" (1 .. 65535){where(tmp_path, 1)}'
    assert conf_error(tmp_path, "port = -5\n").message.startswith(
        '-5 is outside the valid range for parameter "port" (1 .. 65535)')
    assert conf_error(tmp_path, "port = '.4'\n").message.startswith("0 is outside")
    e = conf_error(tmp_path, "", [("max_connections", "262144")])
    assert e.message == '262144 is outside the valid range for parameter "max_connections" (1 .. 262143)'
    assert load_conf(tmp_path, "max_connections = 262143\n").max_connections == 262143


@pytest.mark.parametrize("value, seconds", [
    ("10", 10.0), ("30s", 30.0), ("1min", 60.0), ("'1.5min'", 90.0), ("1500ms", 2.0),
    ("2500ms", 2.0), ("600000000us", 600.0), ("'10 s '", 10.0), ("'1e1min'", 600.0), ("'59.6'", 60.0),
])
def test_time_units(tmp_path, value, seconds):
    s = load_conf(tmp_path, f"authentication_timeout = {value}\n")
    assert s.authentication_timeout == seconds
    assert isinstance(s.authentication_timeout, float)


@pytest.mark.parametrize("value", ["'10 x'", "'10 secs'", "10kB", "10S", "'08'", "10sec"])
def test_bad_time_units(tmp_path, value):
    e = conf_error(tmp_path, f"authentication_timeout = {value}\n")
    assert e.message == (f'invalid value for parameter "authentication_timeout": "{value.strip(chr(39))}"'
                         f'{where(tmp_path, 1)}')
    assert e.hint == TIME_HINT


def test_time_out_of_range_names_the_unit(tmp_path):
    e = conf_error(tmp_path, "authentication_timeout = 1h\n")
    assert e.message == ('3600 s is outside the valid range for parameter "authentication_timeout" (1 .. 600)'
                         f'{where(tmp_path, 1)}')
    e = conf_error(tmp_path, "", [("authentication_timeout", "500ms")])
    assert e.message == '0 s is outside the valid range for parameter "authentication_timeout" (1 .. 600)'
    e = conf_error(tmp_path, "authentication_timeout = abc\n")
    assert e.hint is None


def test_protocol_versions(tmp_path):
    s = load_conf(tmp_path, "ssl_min_protocol_version = 'tlsv1.3'\nssl_max_protocol_version = 'TLSV1.3'\n")
    assert (s.ssl_min_protocol_version, s.ssl_max_protocol_version) == ("TLSv1.3", "TLSv1.3")
    assert load_conf(tmp_path, "ssl_max_protocol_version = ''\n").ssl_max_protocol_version == ""


def test_bad_protocol_versions(tmp_path):
    e = conf_error(tmp_path, "ssl_min_protocol_version = 'TLSv1.4'\n")
    assert e.message == f'invalid value for parameter "ssl_min_protocol_version": "TLSv1.4"{where(tmp_path, 1)}'
    assert e.hint == "Available values: TLSv1, TLSv1.1, TLSv1.2, TLSv1.3."
    e = conf_error(tmp_path, "ssl_min_protocol_version = ''\n")
    assert e.message.startswith('invalid value for parameter "ssl_min_protocol_version": ""')
    e = conf_error(tmp_path, "", [("ssl_max_protocol_version", "SSLv3")])
    assert e.message == 'invalid value for parameter "ssl_max_protocol_version": "SSLv3"'
    assert e.hint == "Available values: , TLSv1, TLSv1.1, TLSv1.2, TLSv1.3."   # sic, as PostgreSQL


@pytest.mark.parametrize("value, expected", [
    ("'*'", ("*",)), ("''", ()), ("'  '", ()), ("'localhost, 10.0.0.1 ,::1'", ("localhost", "10.0.0.1", "::1")),
    ("'\"a b\",\"x\"\"y\"'", ("a b", 'x"y')), ("'\"\"'", ("",)),
])
def test_listen_addresses(tmp_path, value, expected):
    assert load_conf(tmp_path, f"listen_addresses = {value}\n").listen_addresses == expected


@pytest.mark.parametrize("value", ["a b", "a,", ",a", "a,,b", '"a', '"a"b'])
def test_bad_listen_addresses(tmp_path, value):
    e = conf_error(tmp_path, "", [("Listen_Addresses", value)])
    assert e.message == 'invalid list syntax in parameter "listen_addresses"'


def test_unix_socket_directories(tmp_path):
    s = load_conf(tmp_path, "unix_socket_directories = '/var/run/pg a , sockets/, @abstract, \"/q,d\"'\n")
    assert s.unix_socket_directories == ("/var/run/pg a", str(tmp_path / "sockets"), "@abstract", "/q,d")
    assert load_conf(tmp_path, "unix_socket_directories = ''\n").unix_socket_directories == ()
    e = conf_error(tmp_path, "unix_socket_directories = '/a,'\n")
    assert e.message == f'invalid list syntax in parameter "unix_socket_directories"{where(tmp_path, 1)}'


def test_only_honoured_values_are_checked(tmp_path):
    s = load_conf(tmp_path, "shared_buffers = 'lots'\nwork_mem = -1\n", [("wal_level", "bogus")])
    assert s.raw["shared_buffers"] == "lots"


# ---------------------------------------------------------------- defaults and paths

def test_defaults(tmp_path):
    s = load_conf(tmp_path, "")
    d = str(tmp_path)
    assert s == config.Settings(
        data_dir=d, listen_addresses=("localhost",), port=5432, max_connections=100,
        unix_socket_directories=("/tmp",), ssl=False,
        ssl_cert_file=f"{d}/server.crt", ssl_key_file=f"{d}/server.key",
        ssl_ca_file=None, ssl_crl_file=None, ssl_crl_dir=None,
        ssl_ciphers="HIGH:MEDIUM:+3DES:!aNULL", ssl_min_protocol_version="TLSv1.2",
        ssl_max_protocol_version="", ssl_ecdh_curve=None, ssl_prefer_server_ciphers=True,
        ssl_passphrase_command="", ssl_passphrase_command_supports_reload=False,
        hba_file=f"{d}/pg_hba.conf", ident_file=f"{d}/pg_ident.conf", authentication_timeout=60.0,
        pgfast=PGFAST_DEFAULTS, postgres_overrides=(), raw={})


def test_socket_directory_default_comes_from_known(tmp_path):
    s = load_conf(tmp_path, "", known={"unix_socket_directories": "/var/run/postgresql"})
    assert s.unix_socket_directories == ("/var/run/postgresql",)


def test_root_crt_and_root_crl_are_found_when_unset(tmp_path):
    write(tmp_path / "root.crt", "")
    write(tmp_path / "root.crl", "")
    s = load_conf(tmp_path, "")
    assert (s.ssl_ca_file, s.ssl_crl_file) == (str(tmp_path / "root.crt"), str(tmp_path / "root.crl"))
    s = load_conf(tmp_path, "ssl_ca_file = ''\nssl_crl_file = ''\n")
    assert (s.ssl_ca_file, s.ssl_crl_file) == (None, None)
    s = load_conf(tmp_path, "", [("ssl_ca_file", "ca.pem")])
    assert (s.ssl_ca_file, s.ssl_crl_file) == (str(tmp_path / "ca.pem"), str(tmp_path / "root.crl"))


def test_file_settings_are_relative_to_data_directory(tmp_path):
    s = load_conf(tmp_path, "ssl_cert_file = 'tls/c.pem'\nssl_key_file = '/etc/k.pem'\n"
                            "ssl_crl_dir = crls\nhba_file = 'conf/hba'\nident_file = '/etc/ident'\n"
                            "ssl_ca_file = '/etc/ca.pem'\nssl_crl_file = 'x.crl'\n")
    assert s.ssl_cert_file == str(tmp_path / "tls" / "c.pem")
    assert s.ssl_key_file == "/etc/k.pem"
    assert s.ssl_crl_dir == str(tmp_path / "crls")
    assert s.hba_file == str(tmp_path / "conf" / "hba")
    assert s.ident_file == "/etc/ident"
    assert s.ssl_ca_file == "/etc/ca.pem"
    assert s.ssl_crl_file == str(tmp_path / "x.crl")


def test_string_settings(tmp_path):
    s = load_conf(tmp_path, "ssl_ecdh_curve = secp384r1\nssl_ciphers = 'HIGH'\n"
                            "ssl_passphrase_command = 'echo s3cret'\n"
                            "ssl_passphrase_command_supports_reload = on\nssl_crl_dir = ''\n")
    assert (s.ssl_ecdh_curve, s.ssl_ciphers, s.ssl_passphrase_command) == ("secp384r1", "HIGH", "echo s3cret")
    assert s.ssl_passphrase_command_supports_reload is True
    assert s.ssl_crl_dir is None


# ---------------------------------------------------------------- with the real PostgreSQL

def test_describe_config(pgbin, known):
    assert {"port", "ssl", "listen_addresses", "datestyle", "timezone"} <= known.keys()
    assert all(name == name.lower() for name in known)
    assert known["ssl_ciphers"] == "HIGH:MEDIUM:+3DES:!aNULL"
    assert known["unix_socket_directories"]


def test_describe_config_without_postgres(tmp_path):
    with pytest.raises(ConfigError) as caught:
        describe_config(str(tmp_path))
    assert caught.value.message == f'could not execute "{tmp_path / "postgres"}": No such file or directory'


def test_load_with_real_known_settings(tmp_path, known):
    s = load_conf(tmp_path, "shared_buffers = 128MB\nDateStyle = 'iso, mdy'\nzero_damaged_pages = off\n"
                            "pre_auth_delay = 0\nport = 5544\n", [("log_min_messages", "debug1")], known)
    assert s.port == 5544
    expected = tuple(known["unix_socket_directories"].split(","))
    assert s.unix_socket_directories == expected
    e = conf_error(tmp_path, "shared_bufers = 128MB\n", known=known)
    assert e.message == f'unrecognized configuration parameter "shared_bufers"{where(tmp_path, 1)}'
    e = conf_error(tmp_path, "", [("sharedbuffers", "1")], known)
    assert e.message == 'unrecognized configuration parameter "sharedbuffers"'


def test_settings_postgres_omits_from_describe_config_are_known(known):
    # config._UNDESCRIBED was found by asking postgres -C; it must not overlap describe-config.
    assert not config._UNDESCRIBED & known.keys()


ORACLE_FILES = [
    "port = 5433\n",
    "port 0x1F90\n",
    "port = '010'\n",
    "port = 5433.5\n",
    "port = 1e3\n",
    "port = '1e3'\n",
    "port = 99999999999\n",
    "port = -5\n",
    "port = abc\n",
    "port =",
    "port = 1\nport =",
    "PORT = abc\nport = 1\n",
    "port = abc\nport = 1\n",
    "port = 'x\n",
    "a.b.c = 1\n",
    "x = /tmp\n",
    "x = a.b\n",
    "x = a.b.c\n",
    "nosuch = 1\n",
    "ssl = o\n",
    "ssl = of\n",
    "authentication_timeout = '1.5min'\n",
    "authentication_timeout = 2500ms\n",
    "authentication_timeout = '10 secs'\n",
    "authentication_timeout = 1h\n",
    "ssl_min_protocol_version = 'x'\n",
    "ssl_max_protocol_version = 'x'\n",
    "include ''\n",
    "include 'missing.conf'\n",
    "include 'postgresql.conf'\n",
    "include_dir 'nodir'\n",
]
ORACLE_CASES = [(content, ()) for content in ORACLE_FILES] + [
    ("ssl = on\nssl = maybe\nport = 5\n", [("port", "6")]),
    ("port = abc\n", [("port", "5433")]),
    ("port = \n", [("port", "abc")]),
    ("", [("a..b", "1")]),
    ("", [("Port", "x")]),
    ("", [("nosuch", "x")]),
    ("", [("ssl_max_protocol_version", "")]),
]

def postgres_says(pgbin, data_dir, name, overrides):
    options = [f"--{key}={value}" for key, value in overrides]
    return subprocess.run([os.path.join(pgbin, "postgres"), "-C", name, "-D", str(data_dir), *options],
                          capture_output=True, text=True)


@pytest.mark.parametrize("content, overrides", ORACLE_CASES)
def test_same_answer_as_postgres(tmp_path, pgbin, known, content, overrides):
    """postgres -C (allowed as root) reads the same file: same values, or the same first complaint."""
    write(tmp_path / "postgresql.conf", content)
    port = postgres_says(pgbin, tmp_path, "port", overrides)
    try:
        s = load(str(tmp_path), overrides, known)
    except ConfigError as e:
        complaints = [line.split(":  ", 1)[1] for line in port.stderr.splitlines()
                      if ":  " in line and "skipping missing" not in line]
        assert port.returncode != 0
        assert e.message == complaints[0] or e.message.startswith(complaints[0] + " in file ")
    else:
        assert port.returncode == 0, port.stderr
        assert port.stdout.strip() == str(s.port)
        timeout = postgres_says(pgbin, tmp_path, "authentication_timeout", overrides)
        assert timeout.stdout.strip() == str(int(s.authentication_timeout))
