"""pgfast.hba against PostgreSQL 15's pg_hba.conf / pg_ident.conf rules.

Expected parse results and messages were checked against a PostgreSQL 15.18
server's pg_hba_file_rules and pg_ident_file_mappings views.
"""
import socket

import pytest

from pgfast import hba
from pgfast.errors import HbaError

METHODS = frozenset({"trust", "reject", "password", "md5", "scram-sha-256", "cert", "ident", "peer"})


def load(tmp_path, text, supported=METHODS):
    path = tmp_path / "pg_hba.conf"
    path.write_text(text)
    return hba.load_hba(str(path), supported)


def error(tmp_path, text, supported=METHODS):
    with pytest.raises(HbaError) as info:
        load(tmp_path, text, supported)
    return info.value


def line_error(tmp_path, text, line_no=1, supported=METHODS):
    """The message without the ' in file ... line N' suffix, after checking it."""
    message = error(tmp_path, text, supported).message
    suffix = f' in file "{tmp_path / "pg_hba.conf"}" line {line_no}'
    assert message.endswith(suffix), message
    return message[:-len(suffix)]


def strings(tokens):
    return [t.string for t in tokens]


def tcp(rules, address="127.0.0.1", database="db", user="alice", ssl=False, **kw):
    return rules.match(local=False, ssl=ssl, address=address, database=database, user=user, **kw)


def unix(rules, database="db", user="alice", **kw):
    return rules.match(local=True, ssl=False, address=None, database=database, user=user, **kw)


def line_of(match):
    return match.line_no if match else None


# ---------------------------------------------------------------- tokenizing

def test_fields_and_comma_lists(tmp_path):
    rules = load(tmp_path, 'local db1,db2, db3 alice,bob trust\n')
    line = rules.lines[0]
    assert (line.conntype, strings(line.databases), strings(line.users), line.method) == \
        ("local", ["db1", "db2", "db3"], ["alice", "bob"], "trust")
    assert (line.file, line.line_no, line.text) == \
        (str(tmp_path / "pg_hba.conf"), 1, "local db1,db2, db3 alice,bob trust")


def test_blank_before_comma_starts_a_new_field(tmp_path):
    # "a ,b" is two fields in PostgreSQL, so the method field here is "all"
    assert line_error(tmp_path, "local a ,b all trust\n") == 'invalid authentication method "all"'


def test_quoted_keyword_is_a_name(tmp_path):
    rules = load(tmp_path, 'local "all" "all" trust\n')
    assert line_of(unix(rules, database="all", user="all")) == 1
    assert unix(rules, database="db", user="all") is None
    assert unix(rules, database="all", user="alice") is None


def test_quotes_blanks_commas_hash_and_doubled_quotes(tmp_path):
    rules = load(tmp_path, 'local "a b","c,d","e#f" "x""y" trust # comment, "unbalanced\n')
    assert strings(rules.lines[0].databases) == ["a b", "c,d", "e#f"]
    assert strings(rules.lines[0].users) == ['x"y']
    assert rules.lines[0].databases[0].quoted


def test_quote_after_first_character_still_keyword(tmp_path):
    # only a leading quote makes a token literal (PostgreSQL's initial_quote)
    rules = load(tmp_path, 'local a"ll" all trust\n')
    assert rules.lines[0].databases[0] == hba.Token("all", False)
    assert line_of(unix(rules, database="anything")) == 1


def test_empty_quoted_token(tmp_path):
    assert strings(load(tmp_path, 'local "" all trust\n').lines[0].databases) == [""]


def test_comments_and_blank_lines_keep_line_numbers(tmp_path):
    rules = load(tmp_path, "# header\n\n   \t\nlocal all all trust\n")
    assert rules.lines[0].line_no == 4


def test_crlf_line_endings(tmp_path):
    rules = load(tmp_path, "local all all trust\r\nlocal db all reject\r\n")
    assert [(line.line_no, line.method) for line in rules.lines] == [(1, "trust"), (2, "reject")]


def test_backslash_continuation(tmp_path):
    # PostgreSQL 15 joins lines ending in a backslash, also inside quotes
    rules = load(tmp_path, 'local "a\\\n b" all \\\n  trust\nlocal all all reject\n')
    assert strings(rules.lines[0].databases) == ["a b"]
    assert rules.lines[0].text == 'local "a b" all   trust'
    assert [line.line_no for line in rules.lines] == [1, 4]


def test_backslash_continuation_inside_comment(tmp_path):
    rules = load(tmp_path, "local all all trust # note \\\nlocal db all reject\nlocal x all md5\n")
    assert [(line.line_no, line.method) for line in rules.lines] == [(1, "trust"), (3, "md5")]


def test_double_backslash_then_empty_line_is_one_backslash(tmp_path):
    message = line_error(tmp_path, "local all all trust \\\\\n\nlocal x all trust\n")
    assert message == "authentication option not in name=value format: \\"


def test_token_too_long(tmp_path):
    assert load(tmp_path, f"local {'a' * 10239} all trust\n").lines[0].databases[0].string == "a" * 10239
    message = line_error(tmp_path, f"local {'a' * 10240} all trust\n")
    assert message == f'authentication file token too long, skipping: "{"a" * 10239}"'


def test_token_length_counts_bytes(tmp_path):
    load(tmp_path, f"local {'é' * 5119} all trust\n")
    assert line_error(tmp_path, f"local {'é' * 5120} all trust\n").startswith(
        "authentication file token too long")


# ---------------------------------------------------------------- @files

def test_at_file_relative_to_hba_directory(tmp_path):
    (tmp_path / "dbs").write_text("db1, db2\n# comment\n\"all\" db3 # trailing\n")
    rules = load(tmp_path, "local x,@dbs,y all trust\n")
    assert strings(rules.lines[0].databases) == ["x", "db1", "db2", "all", "db3", "y"]
    assert rules.lines[0].databases[3].quoted
    assert line_of(unix(rules, database="all")) == 1
    assert unix(rules, database="other") is None


def test_at_file_for_users_and_nested_relative_to_included_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "users").write_text("alice @more\n")
    (tmp_path / "sub" / "more").write_text("bob,+staff\n")
    rules = load(tmp_path, "local all @sub/users trust\n")
    assert strings(rules.lines[0].users) == ["alice", "bob", "+staff"]
    assert rules.needs_roles
    assert line_of(unix(rules, user="carol", roles=frozenset({"carol", "staff"}))) == 1


def test_at_file_absolute_path(tmp_path):
    (tmp_path / "abs").write_text("db9\n")
    assert strings(load(tmp_path, f"local @{tmp_path / 'abs'} all trust\n").lines[0].databases) == ["db9"]


def test_quoted_at_is_a_name_and_quoted_file_name_is_included(tmp_path):
    (tmp_path / "my dbs").write_text("db1\n")
    rules = load(tmp_path, 'local "@x",@,@"my dbs" all trust\n')
    assert strings(rules.lines[0].databases) == ["@x", "@", "db1"]


def test_missing_at_file(tmp_path):
    assert line_error(tmp_path, "local all all trust\nlocal @nope all trust\n", line_no=2) == \
        f'could not open secondary authentication file "@nope" as "{tmp_path / "nope"}": ' \
        "No such file or directory"


def test_empty_at_file_drops_its_field(tmp_path):
    # PostgreSQL then reads the next field as the database list
    (tmp_path / "empty").write_text("# nothing\n")
    assert line_error(tmp_path, "local @empty all trust\n") == "end-of-line before authentication method"
    assert strings(load(tmp_path, "local @empty all all trust\n").lines[0].databases) == ["all"]


def test_at_file_recursion_is_bounded(tmp_path):
    (tmp_path / "loop").write_text("@loop\n")
    assert "maximum nesting depth exceeded" in line_error(tmp_path, "local @loop all trust\n")


def test_error_inside_at_file_is_reported_on_the_including_line(tmp_path):
    (tmp_path / "bad").write_text("@gone\n")
    assert line_error(tmp_path, "local @bad all trust\n").startswith(
        'could not open secondary authentication file "@gone"')


# ---------------------------------------------------------------- connection types

def test_local_matches_only_unix_sockets(tmp_path):
    rules = load(tmp_path, "local all all trust\n")
    assert line_of(unix(rules)) == 1
    assert tcp(rules) is None


def test_host_matches_ssl_and_plain_tcp(tmp_path):
    rules = load(tmp_path, "host all all 127.0.0.1/32 trust\n")
    assert line_of(tcp(rules, ssl=False)) == 1
    assert line_of(tcp(rules, ssl=True)) == 1
    assert unix(rules) is None


def test_hostssl_and_hostnossl(tmp_path):
    rules = load(tmp_path, "hostssl all all all md5\nhostnossl all all all reject\n")
    assert line_of(tcp(rules, ssl=True)) == 1
    assert line_of(tcp(rules, ssl=False)) == 2
    assert unix(rules) is None


def test_hostgssenc_never_matches_and_hostnogssenc_is_host(tmp_path):
    rules = load(tmp_path, "hostgssenc all all all trust\nhostnogssenc all all all md5\n")
    assert line_of(tcp(rules, ssl=True)) == 2
    assert line_of(tcp(rules, ssl=False)) == 2
    assert unix(rules) is None


def test_first_matching_line_wins_and_none_when_nothing_matches(tmp_path):
    rules = load(tmp_path, "host db alice all reject\nhost all all all md5\nhost db alice all trust\n")
    assert tcp(rules).method == "reject"
    assert tcp(rules, user="bob").method == "md5"
    assert load(tmp_path, "host db alice all trust\n").match(
        local=False, ssl=False, address="127.0.0.1", database="db", user="bob") is None


def test_tcp_match_needs_an_address(tmp_path):
    with pytest.raises(ValueError):
        tcp(load(tmp_path, "local all all trust\n"), address=None)


# ---------------------------------------------------------------- databases and users

def test_database_keywords(tmp_path):
    rules = load(tmp_path, "local sameuser all trust\nlocal samerole all md5\n"
                           "local samegroup all password\nlocal db1 all reject\n")
    roles = frozenset({"alice", "staff"})
    assert unix(rules, database="alice", user="alice", roles=roles).method == "trust"
    assert unix(rules, database="staff", user="alice", roles=roles).method == "md5"
    assert unix(rules, database="db1", user="alice", roles=roles).method == "reject"
    assert unix(rules, database="other", user="alice", roles=roles) is None


def test_samerole_includes_the_user_itself_only_through_roles(tmp_path):
    rules = load(tmp_path, "local samerole all trust\n")
    assert rules.needs_roles
    assert line_of(unix(rules, database="alice", user="alice", roles=frozenset({"alice"}))) == 1
    # a user that does not exist is a member of nothing
    assert unix(rules, database="ghost", user="ghost", roles=frozenset()) is None


def test_roles_required_when_rules_use_them(tmp_path):
    rules = load(tmp_path, "local all +staff trust\n")
    with pytest.raises(ValueError):
        unix(rules)
    assert not load(tmp_path, "local all alice trust\n").needs_roles


def test_group_membership(tmp_path):
    rules = load(tmp_path, 'local all +staff trust\nlocal all "+staff" md5\n')
    assert unix(rules, user="alice", roles=frozenset({"alice", "staff"})).method == "trust"
    assert unix(rules, user="bob", roles=frozenset({"bob"})) is None
    # quoted: a role literally named +staff
    assert unix(rules, user="+staff", roles=frozenset({"+staff"})).method == "md5"


def test_replication_keyword(tmp_path):
    rules = load(tmp_path, "local all all trust\nlocal replication all md5\n")
    assert unix(rules, database="db").method == "trust"
    # a physical replication connection skips "all"
    assert unix(rules, database="db", replication=True).method == "md5"
    assert load(tmp_path, "local all all trust\n").match(
        local=True, ssl=False, address=None, database="db", user="u", replication=True) is None


def test_replication_keyword_never_matches_ordinary_connections(tmp_path):
    rules = load(tmp_path, 'local replication all trust\nlocal "replication" all md5\n')
    assert unix(rules, database="replication").method == "md5"


def test_user_all_and_names(tmp_path):
    rules = load(tmp_path, "local all alice,bob trust\nlocal all all md5\n")
    assert unix(rules, user="bob").method == "trust"
    assert unix(rules, user="carol").method == "md5"


# ---------------------------------------------------------------- addresses

def test_cidr_v4(tmp_path):
    rules = load(tmp_path, "host all all 10.1.0.0/16 trust\n")
    assert line_of(tcp(rules, address="10.1.255.3")) == 1
    assert tcp(rules, address="10.2.0.1") is None


def test_cidr_ignores_host_bits_like_postgresql(tmp_path):
    rules = load(tmp_path, "host all all 10.0.0.1/8 trust\n")
    assert line_of(tcp(rules, address="10.200.0.9")) == 1


def test_cidr_v6(tmp_path):
    rules = load(tmp_path, "host all all ::1/128 trust\nhost all all fd00::/64 md5\n")
    assert tcp(rules, address="::1").method == "trust"
    assert tcp(rules, address="fd00::abcd").method == "md5"
    assert tcp(rules, address="fd01::1") is None


def test_separate_mask_field(tmp_path):
    rules = load(tmp_path, "host all all 192.168.12.0 255.255.255.0 trust\n")
    line = rules.lines[0]
    assert (line.ip_cmp, line.ip) == ("mask", hba.IpRange(4, 0xC0A80C00, 0xFFFFFF00))
    assert line_of(tcp(rules, address="192.168.12.99")) == 1
    assert tcp(rules, address="192.168.13.1") is None


def test_libc_numeric_forms_and_cidr_length_syntax(tmp_path):
    # getaddrinfo reads "127.1" as 127.0.0.1; strtol accepts "+8"
    rules = load(tmp_path, "host all all 127.1/+8 trust\n")
    assert rules.lines[0].ip == hba.IpRange(4, 0x7F000001, 0xFF000000)


def test_address_families_do_not_mix(tmp_path):
    rules = load(tmp_path, "host all all 127.0.0.1/32 trust\nhost all all 0.0.0.0/0 md5\n")
    assert tcp(rules, address="::1") is None
    # PostgreSQL 15 does not unmap IPv4-mapped IPv6 addresses
    assert tcp(rules, address="::ffff:127.0.0.1") is None
    v6 = load(tmp_path, "host all all ::/0 trust\n")
    assert tcp(v6, address="127.0.0.1") is None
    assert line_of(tcp(v6, address="::ffff:127.0.0.1")) == 1


def test_address_all(tmp_path):
    rules = load(tmp_path, "host all all all trust\n")
    assert line_of(tcp(rules, address="203.0.113.7")) == 1
    assert line_of(tcp(rules, address="2001:db8::1")) == 1


def test_samehost(tmp_path):
    rules = load(tmp_path, "host all all samehost trust\n")
    assert line_of(tcp(rules, address="127.0.0.1")) == 1
    # on lo's 127.0.0.0/8 subnet, but not one of this machine's addresses
    assert tcp(rules, address="127.0.0.2") is None
    assert tcp(rules, address="203.0.113.7") is None


def test_samehost_ipv6_loopback(tmp_path):
    if not any(r.version == 6 and r.address == 1 for r in hba._interface_ranges(True)):
        pytest.skip("no ::1 on this machine")
    assert line_of(tcp(load(tmp_path, "host all all samehost trust\n"), address="::1")) == 1


def test_samenet(tmp_path):
    rules = load(tmp_path, "host all all samenet trust\n")
    assert line_of(tcp(rules, address="127.0.0.2")) == 1
    assert line_of(tcp(rules, address="127.200.1.1")) == 1
    assert tcp(rules, address="203.0.113.7") is None


def test_quoted_address_keyword_is_a_host_name(tmp_path):
    rules = load(tmp_path, 'host all all "samehost" trust\n')
    assert (rules.lines[0].ip_cmp, rules.lines[0].hostname) == ("hostname", "samehost")
    assert rules.needs_hostname


def test_host_names(tmp_path):
    rules = load(tmp_path, "host all all db.example.com trust\nhost all all .example.org md5\n")
    assert rules.needs_hostname
    assert tcp(rules, client_hostname="DB.Example.COM").method == "trust"
    assert tcp(rules, client_hostname="a.b.example.org").method == "md5"
    assert tcp(rules, client_hostname="example.org") is None
    assert tcp(rules, client_hostname="xdb.example.com") is None
    # no (confirmed) host name: host-name lines cannot match
    assert tcp(rules, client_hostname=None) is None
    assert not load(tmp_path, "host all all all trust\n").needs_hostname


def test_resolve_client_hostname_needs_forward_confirmation(monkeypatch):
    monkeypatch.setattr(socket, "getnameinfo", lambda sa, flags: ("client.example.com", "0"))
    answers = {"client.example.com": [(socket.AF_INET, 1, 6, "", ("192.0.2.10", 0))]}
    monkeypatch.setattr(socket, "getaddrinfo", lambda name, port: answers[name])
    assert hba.resolve_client_hostname("192.0.2.10") == "client.example.com"
    assert hba.resolve_client_hostname("192.0.2.11") is None


def test_resolve_client_hostname_failed_reverse_lookup(monkeypatch):
    def fail(sa, flags):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    monkeypatch.setattr(socket, "getnameinfo", fail)
    assert hba.resolve_client_hostname("192.0.2.10") is None


def test_resolve_client_hostname_localhost():
    try:
        expected = socket.gethostbyaddr("127.0.0.1")[0]
    except OSError:
        pytest.skip("127.0.0.1 has no name here")
    assert hba.resolve_client_hostname("127.0.0.1") == expected


# ---------------------------------------------------------------- methods and options

def test_clientcert_and_map(tmp_path):
    rules = load(tmp_path, "hostssl all all all md5 clientcert=verify-ca\n"
                           "hostssl all all all trust clientcert=verify-full\n"
                           "hostssl all all all cert map=certmap\n"
                           "hostssl all all all cert clientcert=verify-full,clientname=CN\n"
                           "local all all ident map=\n"
                           "local all all md5\n")
    got = [(line.method, line.clientcert, line.map) for line in rules.lines]
    assert got == [("md5", "verify-ca", None), ("trust", "verify-full", None),
                   ("cert", "verify-full", "certmap"), ("cert", "verify-full", None),
                   ("peer", None, None), ("md5", None, None)]


def test_local_ident_becomes_peer(tmp_path):
    assert load(tmp_path, "local all all ident\n").lines[0].method == "peer"
    assert load(tmp_path, "host all all all ident\n").lines[0].method == "ident"


@pytest.mark.parametrize("text, message", [
    ("local all all foo\n", 'invalid authentication method "foo"'),
    ("local all all md5 foo=bar\n", 'unrecognized authentication option name: "foo"'),
    ("local all all md5 nothing\n", "authentication option not in name=value format: nothing"),
    ("local all all md5 map=x\n",
     'authentication option "map" is only valid for authentication methods ident, peer, gssapi, sspi, and cert'),
    ("local all all md5 ldapserver=x\n",
     'authentication option "ldapserver" is only valid for authentication methods ldap'),
    ("local all all md5 krb_realm=x\n",
     'authentication option "krb_realm" is only valid for authentication methods gssapi and sspi'),
    ("local all all md5 radiusservers=x\n",
     'authentication option "radiusservers" is only valid for authentication methods radius'),
    ("host all all all md5 clientcert=verify-ca\n", 'clientcert can only be configured for "hostssl" rows'),
    ("hostssl all all all cert clientcert=verify-ca\n",
     'clientcert only accepts "verify-full" when using "cert" authentication'),
    ("hostssl all all all md5 clientcert=1\n", 'invalid value for clientcert: "1"'),
    ("host all all all md5 clientname=DN\n", 'clientname can only be configured for "hostssl" rows'),
    ("hostssl all all all md5 clientname=XX\n", 'invalid value for clientname: "XX"'),
    ("hostssl all all all cert clientname=DN\n", "clientname=DN is not supported by pgfast"),
    ("host all all all cert\n", "cert authentication is only supported on hostssl connections"),
    ("host all all all peer\n", "peer authentication is only supported on local sockets"),
    ("hostx all all all trust\n", 'invalid connection type "hostx"'),
    ("local\n", "end-of-line before database specification"),
    ("local all\n", "end-of-line before role specification"),
    ("host all all\n", "end-of-line before IP address specification"),
    ("host all all all\n", "end-of-line before authentication method"),
    ("local all all\n", "end-of-line before authentication method"),
    ("host all all 1.2.3.4/33 trust\n", 'invalid CIDR mask in address "1.2.3.4/33"'),
    ("host all all ::1/129 trust\n", 'invalid CIDR mask in address "::1/129"'),
    ("host all all 1.2.3.4/0x8 trust\n", 'invalid CIDR mask in address "1.2.3.4/0x8"'),
    ("host all all foo/8 trust\n", 'specifying both host name and CIDR mask is invalid: "foo/8"'),
    ("host all all 1.2.3.4 trust\n", 'invalid IP mask "trust": Name or service not known'),
    ("host all all 1.2.3.4 ffff:: trust\n", "IP address and mask do not match"),
])
def test_line_errors(tmp_path, text, message):
    assert line_error(tmp_path, text) == message


@pytest.mark.parametrize("text, message, hint", [
    ("host,local all all trust\n", "multiple values specified for connection type",
     "Specify exactly one connection type per line."),
    ("host all all 1.2.3.4,5.6.7.8 trust\n", "multiple values specified for host address",
     "Specify one address range per line."),
    ("host all all 1.2.3.4\n", "end-of-line before netmask specification",
     "Specify an address range in CIDR notation, or provide a separate netmask."),
    ("local all all trust,md5\n", "multiple values specified for authentication type",
     "Specify exactly one authentication type per line."),
])
def test_line_errors_with_hints(tmp_path, text, message, hint):
    assert line_error(tmp_path, text) == message
    assert error(tmp_path, text).hint == hint


def test_multiple_netmask_values(tmp_path):
    assert line_error(tmp_path, "host all all 1.2.3.4 255.0.0.0,255.0.0.0 trust\n") == \
        "multiple values specified for netmask"


def test_error_names_the_right_line(tmp_path):
    assert line_error(tmp_path, "local all all trust\n# c\nlocal all all bogus\n", line_no=3) == \
        'invalid authentication method "bogus"'


@pytest.mark.parametrize("method", ["ldap", "gss", "sspi", "pam", "bsd", "radius"])
def test_methods_pgfast_cannot_perform(tmp_path, method):
    assert line_error(tmp_path, f"host all all all {method}\n") == \
        f'authentication method "{method}" is not supported by pgfast'


def test_method_left_out_by_caller_is_refused_not_weakened(tmp_path):
    supported = frozenset({"trust", "reject", "cert"})
    assert line_error(tmp_path, "host all all all md5\n", supported=supported) == \
        'authentication method "md5" is not supported by pgfast'
    assert line_error(tmp_path, "local all all ident\n", supported=frozenset({"ident"})) == \
        'authentication method "peer" is not supported by pgfast'


def test_caller_cannot_claim_methods_whose_options_are_not_read(tmp_path):
    with pytest.raises(ValueError):
        load(tmp_path, "local all all trust\n", supported=METHODS | {"ldap"})


def test_file_without_entries(tmp_path):
    path = tmp_path / "pg_hba.conf"
    assert error(tmp_path, "# nothing here\n\n").message == \
        f'configuration file "{path}" contains no entries'
    assert error(tmp_path, "").message == f'configuration file "{path}" contains no entries'


def test_missing_file(tmp_path):
    path = tmp_path / "absent.conf"
    with pytest.raises(HbaError) as info:
        hba.load_hba(str(path), METHODS)
    assert info.value.message == f'could not open configuration file "{path}": No such file or directory'


# ---------------------------------------------------------------- pg_ident.conf

def ident(tmp_path, text):
    path = tmp_path / "pg_ident.conf"
    path.write_text(text)
    return hba.load_ident(str(path))


def ident_error(tmp_path, text, line_no=1):
    with pytest.raises(HbaError) as info:
        ident(tmp_path, text)
    suffix = f' in file "{tmp_path / "pg_ident.conf"}" line {line_no}'
    assert info.value.message.endswith(suffix), info.value.message
    return info.value.message[:-len(suffix)]


def test_ident_plain_entries(tmp_path):
    idmap = ident(tmp_path, "# MAP SYSTEM PG\nadmins root postgres\nadmins \"jane doe\" jane\n")
    assert idmap.check("admins", "root", "postgres")
    assert idmap.check("admins", "jane doe", "jane")
    assert not idmap.check("admins", "root", "jane")
    assert not idmap.check("other", "root", "postgres")


def test_ident_regex_with_backreference(tmp_path):
    idmap = ident(tmp_path, "certs /^(.*)@example\\.com$ \\1\ncerts /^admin-(.*)$ \\1_adm\n")
    assert idmap.check("certs", "alice@example.com", "alice")
    assert not idmap.check("certs", "alice@example.com", "bob")
    assert not idmap.check("certs", "alice@example.org", "alice")
    assert idmap.check("certs", "admin-bob", "bob_adm")


def test_ident_regex_is_unanchored_search_and_without_backreference(tmp_path):
    idmap = ident(tmp_path, "m /ops postgres\n")
    assert idmap.check("m", "devops-team", "postgres")
    assert not idmap.check("m", "dev", "postgres")


def test_ident_backreference_without_group_fails_and_stops(tmp_path):
    idmap = ident(tmp_path, "m /^x \\1\nm x x\n")
    assert not idmap.check("m", "x", "x")


def test_ident_only_first_backreference_substituted(tmp_path):
    assert ident(tmp_path, "m /^(a)$ \\1\\1\n").check("m", "a", "a\\1")


def test_ident_regex_dialect(tmp_path):
    idmap = ident(tmp_path, "m /^[[:alpha:]]+$ letters\nm /^a\\yb x\nn /^(\\w+)$ \\1\n")
    assert idmap.check("m", "abc", "letters")
    assert not idmap.check("m", "ab1", "letters")
    # ARE's \y is a word boundary (Python's \b)
    assert not idmap.check("m", "ab", "x")
    # C-collation classes are ASCII-only; $ is the very end of the string
    assert not idmap.check("n", "é", "é")
    assert not idmap.check("n", "bob\n", "bob")


def test_ident_without_map_compares_names(tmp_path):
    idmap = ident(tmp_path, "")
    assert idmap.check(None, "alice", "alice")
    assert not idmap.check("", "alice", "bob")


def test_ident_missing_file_is_an_empty_map(tmp_path):
    idmap = hba.load_ident(str(tmp_path / "nope.conf"))
    assert idmap.lines == ()
    assert not idmap.check("m", "a", "a")


def test_ident_at_file(tmp_path):
    (tmp_path / "who").write_text("root\n")
    assert ident(tmp_path, "m @who postgres\n").check("m", "root", "postgres")


@pytest.mark.parametrize("text, message", [
    ("m1 a\n", "missing entry at end of line"),
    ("m1\n", "missing entry at end of line"),
    ("m1 a,b c\n", "multiple values in ident field"),
    ("m1,m2 a c\n", "multiple values in ident field"),
])
def test_ident_line_errors(tmp_path, text, message):
    assert ident_error(tmp_path, text) == message


def test_ident_bad_regex(tmp_path):
    message = ident_error(tmp_path, "ok a b\nm /( x\n", line_no=2)
    assert message.startswith('invalid regular expression "(": ')


def test_ident_extra_fields_are_ignored(tmp_path):
    assert ident(tmp_path, "m a b c d\n").check("m", "a", "b")
