"""sftpauth.config: the INI loader, its value checks and the frozen models (SPEC §2, §3)."""

from __future__ import annotations

import os
import textwrap

import attrs
import pytest

from sftpauth.config import models
from sftpauth.config.errors import ConfigError, ConfigProblem
from sftpauth.config.loader import load_configuration, parse_configuration
from sftpauth.permissions import FULL_CONTROL, Permission

PATH = "/etc/sftpauth/server.ini"
BASE = "/etc/sftpauth"


def parse(text: str, environ=None, base_folder: str = BASE) -> models.Configuration:
    return parse_configuration(textwrap.dedent(text), PATH, base_folder, environ or {})


def problems_of(text: str, environ=None, base_folder: str = BASE) -> tuple[ConfigProblem, ...]:
    with pytest.raises(ConfigError) as caught:
        parse(text, environ, base_folder)
    return caught.value.problems


def only_problem(text: str, environ=None) -> ConfigProblem:
    problems = problems_of(text, environ)
    assert len(problems) == 1, "\n".join(str(p) for p in problems)
    return problems[0]


@pytest.fixture(scope="module")
def password_hash(make_hash):
    return make_hash("correct horse")


# -- a valid file ------------------------------------------------------------------


@pytest.fixture
def full_configuration(password_hash):
    return parse(
        f"""
        [server]
        name = Transfer server
        authentications = local

        [services/ftp]
        type = ftp
        port = 2121

        [services/sftp]
        type = ssh
        port = 2222
        address = 0.0.0.0

        [authentications/local]
        type = application

        [groups/staff]
        home_folder_path = /srv/ftp

        [accounts/alice]
        password = {password_hash}
        group = staff
        """
    )


def test_valid_file_builds_frozen_models(full_configuration):
    """Every section kind is built into its own frozen attrs model."""
    configuration = full_configuration
    assert isinstance(configuration.server, models.ServerSettings)
    assert isinstance(configuration.services["ftp"], models.FTPServiceSettings)
    assert isinstance(configuration.services["sftp"], models.SSHServiceSettings)
    assert isinstance(configuration.authentications["local"], models.ApplicationAuthenticationSettings)
    assert isinstance(configuration.groups["staff"], models.GroupSettings)
    assert isinstance(configuration.accounts["alice"], models.AccountSettings)
    for frozen in (
        configuration,
        configuration.server,
        configuration.services["ftp"],
        configuration.authentications["local"],
        configuration.groups["staff"],
        configuration.accounts["alice"],
    ):
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            frozen.name = "changed"
    assert configuration.path == PATH
    assert configuration.warnings == ()


def test_service_defaults_follow_the_spec(full_configuration):
    """A service without options gets address 127.0.0.1, timeout 300, 10000 connections, enabled."""
    ftp = full_configuration.services["ftp"]
    assert ftp.id == "ftp"
    assert ftp.type == "ftp"
    assert ftp.port == 2121
    assert ftp.address == "127.0.0.1"
    assert ftp.enabled is True
    assert ftp.idle_connection_timeout == 300
    assert ftp.maximum_concurrent_connections == 10000
    assert ftp.authentications == ()
    assert ftp.security_policy == models.DEFAULT_SECURITY_POLICY
    assert ftp.passive_port_range is None
    sftp = full_configuration.services["sftp"]
    assert sftp.address == "0.0.0.0"
    assert sftp.sftp is True
    assert sftp.ssh_server_keys == ()


def test_group_and_account_defaults_follow_the_spec(full_configuration, password_hash):
    """Groups default to full control, enabled, no home creation; accounts are enabled."""
    staff = full_configuration.groups["staff"]
    assert staff.permissions == FULL_CONTROL
    assert staff.enabled is True
    assert staff.create_home_folder is False
    assert staff.home_folder_path == "/srv/ftp"
    alice = full_configuration.accounts["alice"]
    assert alice.username == "alice"
    assert alice.enabled is True
    assert alice.group == ("staff",)
    assert alice.password == password_hash
    assert password_hash not in repr(alice)


def test_default_group_and_authentication_are_implicit():
    """An empty file still has DEFAULT_GROUP, DEFAULT-AUTHENTICATION and [server] defaults."""
    configuration = parse("")
    assert configuration.server.authentications == (models.DEFAULT_AUTHENTICATION,)
    assert configuration.server.name == "sftpauth"
    assert configuration.server.state == "memory"
    assert configuration.server.workers == 1
    default_method = configuration.authentications[models.DEFAULT_AUTHENTICATION]
    assert default_method.type == "application"
    assert default_method.enabled is True
    default_group = configuration.groups[models.DEFAULT_GROUP]
    assert default_group.permissions == FULL_CONTROL
    assert default_group.enabled is True
    assert configuration.services == {}
    assert configuration.accounts == {}


def test_account_group_defaults_to_default_group(password_hash):
    """An account without ``group`` belongs to DEFAULT_GROUP."""
    configuration = parse(
        f"""
        [accounts/bob]
        password = {password_hash}
        """
    )
    assert configuration.accounts["bob"].group == (models.DEFAULT_GROUP,)


def test_sftp_is_an_alias_of_ssh():
    """``type = sftp`` builds the same SSH service model as ``type = ssh``."""
    configuration = parse(
        """
        [services/s]
        type = sftp
        port = 22
        sftp = no
        """
    )
    service = configuration.services["s"]
    assert isinstance(service, models.SSHServiceSettings)
    assert service.sftp is False


def test_typed_values_are_converted():
    """Port ranges, yes/no words, numbers and relative paths become typed values."""
    configuration = parse(
        """
        [server]
        audit_log = logs/audit.jsonl

        [services/f]
        type = ftp
        port = 21
        enabled = No
        passive_port_range = 60000 - 60100
        idle_connection_timeout = 0
        maximum_concurrent_connections = 1

        [groups/g]
        home_folder_path = homes/${USER}
        create_home_folder = yes
        permissions = deny-full-control, allow-read
        """
    )
    service = configuration.services["f"]
    assert service.enabled is False
    assert service.passive_port_range == (60000, 60100)
    assert service.idle_connection_timeout == 0
    assert service.maximum_concurrent_connections == 1
    assert configuration.server.audit_log == os.path.join(BASE, "logs", "audit.jsonl")
    group = configuration.groups["g"]
    assert group.home_folder_path == os.path.join(BASE, "homes", "${USER}")
    assert group.create_home_folder is True
    assert group.permissions == frozenset()


# -- continuation lines ------------------------------------------------------------

METHODS = """
[authentications/A]
type = application
[authentications/B]
type = application
[authentications/C]
type = application
"""


@pytest.mark.parametrize(
    "server",
    [
        "authentications = A, B, C\n",
        "authentications =\n    A\n    B\n    C\n",
        "authentications = A\n    B\n    C\n",
        "authentications =\n\tA\n\tB,\n\tC\n",
        "authentications =\n    A\n# a comment\n    ; another comment\n    B\n\n    C\n",
    ],
    ids=["comma-list", "no-first-value", "first-value", "tabs-and-commas", "comments-between"],
)
def test_continuation_lines_give_the_same_tuple_as_a_comma_list(server):
    """Indented continuation lines, with or without a first value and with comments, are list items."""
    configuration = parse_configuration("[server]\n" + server + METHODS, PATH, BASE, {})
    assert configuration.server.authentications == ("A", "B", "C")


def test_inline_comment_on_a_continuation_line_is_dropped():
    """An inline comment after a continuation value is a comment, as after the first value."""
    configuration = parse_configuration(
        "[server]\nauthentications = A  # first\n    B  ; second\n    C\n" + METHODS, PATH, BASE, {}
    )
    assert configuration.server.authentications == ("A", "B", "C")


@pytest.mark.parametrize(
    "line, expected",
    [
        ("service_account_password = pa#ss;word", "pa#ss;word"),
        ("service_account_password = pa#ss  # the comment", "pa#ss"),
        ('service_account_password = "quoted # kept"', "quoted # kept"),
        ("service_account_password = pa#ss ; the comment", "pa#ss"),
        ('service_account_password = "quoted ; kept" ; the comment', "quoted ; kept"),
        ("service_account_password = 'quoted # kept'   ;the comment", "quoted # kept"),
    ],
)
def test_hash_inside_a_one_line_value_is_kept(line, expected):
    """Only " #" or " ;" starts a comment: a one-line value keeps a '#' (configobj alone cut "pa#ss" to "pa")."""
    configuration = parse(
        f"""
        [authentications/directory]
        type = ldap
        address = 127.0.0.1
        bind_dn_type = search
        bind_dn = dc=example,dc=com
        service_account_dn = cn=reader,dc=example,dc=com
        {line}
        search_filter = (description=#x)
        """
    )
    method = configuration.authentications["directory"]
    assert method.service_account_password == expected
    assert method.search_filter is not None


def test_continuation_lines_of_permissions():
    """Permissions given one per line become the same set as a comma list."""
    configuration = parse(
        """
        [groups/readers]
        permissions =
            allow-read
            allow-list
        """
    )
    assert configuration.groups["readers"].permissions == {Permission.READ, Permission.LIST}


def test_line_numbers_are_right_after_a_multi_line_value():
    """Errors after a continuation value point at their own line, not a shifted one."""
    text = (
        "[server]\n"  # 1
        "authentications =\n"  # 2
        "    A\n"  # 3
        "    # comment\n"  # 4
        "    B\n"  # 5
        "\n"  # 6
        "    C\n"  # 7
        "bogus = 1\n"  # 8
        "[authentications/A]\n"  # 9
        "type = application\n"  # 10
        "enabled = perhaps\n"  # 11
    )
    problems = problems_of_text(text)
    by_option = {(p.section, p.option): p.line for p in problems}
    assert by_option[("server", "bogus")] == 8
    assert by_option[("authentications/A", "enabled")] == 11
    # B and C do not exist: the problem is on the option's first line.
    assert by_option[("server", "authentications")] == 2


def problems_of_text(text: str) -> tuple[ConfigProblem, ...]:
    with pytest.raises(ConfigError) as caught:
        parse_configuration(text, PATH, BASE, {})
    return caught.value.problems


# -- secrets -----------------------------------------------------------------------


def test_env_secret_is_resolved(password_hash):
    """``password = env:NAME`` takes the value of the environment variable."""
    configuration = parse(
        """
        [accounts/alice]
        password = env:ALICE_HASH
        """,
        environ={"ALICE_HASH": password_hash},
    )
    assert configuration.accounts["alice"].password == password_hash


def test_file_secret_is_resolved_relative_to_the_configuration(tmp_path, password_hash):
    """``password = file:PATH`` reads the file (relative to the config folder), without its newline."""
    (tmp_path / "alice.hash").write_text(password_hash + "\n", encoding="utf-8")
    absolute = tmp_path / "bob.hash"
    absolute.write_text(password_hash, encoding="utf-8")
    configuration = parse(
        f"""
        [accounts/alice]
        password = file:alice.hash
        [accounts/bob]
        password = file:{absolute}
        """,
        base_folder=str(tmp_path),
    )
    assert configuration.accounts["alice"].password == password_hash
    assert configuration.accounts["bob"].password == password_hash


def test_missing_env_secret_is_an_error_naming_the_option():
    """An unset environment variable is an error on that option, naming the variable."""
    problem = only_problem(
        """
        [accounts/alice]
        password = env:NOT_SET_ANYWHERE
        """
    )
    assert (problem.line, problem.section, problem.option) == (3, "accounts/alice", "password")
    assert "NOT_SET_ANYWHERE" in problem.message


def test_unreadable_file_secret_is_an_error_naming_the_option(tmp_path):
    """A secret file that cannot be read is an error on that option."""
    problem = only_problem(
        f"""
        [accounts/alice]
        password = file:{tmp_path / 'missing'}
        """
    )
    assert (problem.line, problem.section, problem.option) == (3, "accounts/alice", "password")
    assert "cannot read secret file" in problem.message
    assert "No such file" in problem.message


# -- error messages ----------------------------------------------------------------


def test_problem_string_format():
    """A problem reads ``FILE:LINE [section] option: message``; without a line, ``FILE [section] ...``."""
    assert str(ConfigProblem("/x.ini", 7, "services/ftp", "port", "bad")) == "/x.ini:7 [services/ftp] port: bad"
    assert str(ConfigProblem("/x.ini", None, "groups/g", None, "bad")) == "/x.ini [groups/g]: bad"
    assert str(ConfigProblem("/x.ini", 3, None, None, "bad")) == "/x.ini:3: bad"
    error = ConfigError([ConfigProblem("/a", 1, "s", "o", "m1"), ConfigProblem("/a", 2, "s", "p", "m2")])
    assert str(error) == "/a:1 [s] o: m1\n/a:2 [s] p: m2"


def test_error_string_names_file_line_section_and_option():
    """The text shown to administrators carries file, line, section, option and message."""
    with pytest.raises(ConfigError) as caught:
        parse(
            """
            [services/ftp]
            type = ftp
            port = 21
            enabled = maybe
            """
        )
    assert str(caught.value) == f"{PATH}:5 [services/ftp] enabled: 'maybe' is not yes or no"


ERROR_CASES = [
    pytest.param(
        "[authentications/ldap]\ntype = ldap\naddress = 127.0.0.1\nbind_dn = =people,dc=example,dc=com\n",
        4,
        "authentications/ldap",
        "bind_dn",
        ["'=people,dc=example,dc=com' is not a distinguished name", "'' is not an attribute name"],
        id="dn-without-attribute-type",
    ),
    pytest.param(
        "[authentications/ldap]\ntype = ldap\naddress = 127.0.0.1\nbind_dn = ou = people,dc=example,dc=com\n",
        4,
        "authentications/ldap",
        "bind_dn",
        ["'ou ' is not an attribute name", "without spaces around '='"],
        id="dn-with-spaces-around-equals",
    ),
    pytest.param(
        "[services/ftp]\ntype = ftp\nport = 21\nprot = 22\n",
        4,
        "services/ftp",
        "prot",
        ["unknown option", "did you mean 'port'?", "allowed:", "passive_port_range"],
        id="unknown-option",
    ),
    pytest.param(
        "[server]\nname = x\n[users/alice]\nname = a\n",
        3,
        "users/alice",
        None,
        ["unknown section", "[services/ID]", "[accounts/ID]"],
        id="unknown-section-kind",
    ),
    pytest.param(
        "[groups/g]\ncreate_home_folder = sometimes\n",
        2,
        "groups/g",
        "create_home_folder",
        ["'sometimes'", "yes or no"],
        id="bad-yes-no",
    ),
    pytest.param(
        "[services/ftp]\ntype = ftp\nport = 21\nidle_connection_timeout = 86401\n",
        4,
        "services/ftp",
        "idle_connection_timeout",
        ["86401 is out of range", "0 to 86400"],
        id="number-out-of-range",
    ),
    pytest.param(
        "[services/ftp]\ntype = ftp\nport = 70000\n",
        3,
        "services/ftp",
        "port",
        ["70000 is out of range", "0 to 65535"],
        id="port-out-of-range",
    ),
    pytest.param(
        "[services/ftp]\ntype = ftp\nport = twenty-one\n",
        3,
        "services/ftp",
        "port",
        ["not a whole number", "0 to 65535"],
        id="port-not-a-number",
    ),
    pytest.param(
        "[services/web]\ntype = http\nport = 80\n",
        2,
        "services/web",
        "type",
        ["'http' is not allowed", "ftp, ftpsi, ssh, sftp, manager, ldap-directory"],
        id="bad-choice",
    ),
    pytest.param(
        "[server]\nstate = disk\n",
        2,
        "server",
        "state",
        ["'disk' is not allowed", "memory"],
        id="bad-choice-server",
    ),
    pytest.param(
        "[services/ftp]\ntype = ftp\nport = 21\npassive_port_range = 60100-60000\n",
        4,
        "services/ftp",
        "passive_port_range",
        ["'60100-60000' is not a port range", "FIRST <= LAST"],
        id="bad-port-range-order",
    ),
    pytest.param(
        "[services/ftp]\ntype = ftp\nport = 21\npassive_port_range = 60000:60100\n",
        4,
        "services/ftp",
        "passive_port_range",
        ["not a port range", "FIRST-LAST"],
        id="bad-port-range-syntax",
    ),
    pytest.param(
        "[services/ftp]\ntype = ftp\nport = 21\naddress = not a host!\n",
        4,
        "services/ftp",
        "address",
        ["not an IP address or host name"],
        id="bad-address",
    ),
    pytest.param(
        "[groups/g]\npermissions = allow-read, allow-execute\n",
        2,
        "groups/g",
        "permissions",
        ["'allow-execute' is not a permission", "allow-full-control", "allow-delete-folder", "deny-full-control"],
        id="bad-permission",
    ),
    pytest.param(
        "[groups/a|b]\nname = x\n",
        1,
        "groups/a|b",
        None,
        ["section ID", "'|'"],
        id="section-id-with-pipe",
    ),
    pytest.param(
        "[groups/]\nname = x\n",
        1,
        "groups/",
        None,
        ["section ID", "non-empty"],
        id="empty-section-id",
    ),
    pytest.param(
        "[groups/g]\nname = x\n[[inner]]\nname = y\n",
        3,
        "groups/g",
        None,
        ["nested section [[inner]]"],
        id="nested-section",
    ),
    pytest.param(
        "[services/ftp]\ntype = ftp\n",
        1,
        "services/ftp",
        "port",
        ["required option is missing"],
        id="missing-port",
    ),
    pytest.param(
        "[services/ftp]\nport = 21\n",
        1,
        "services/ftp",
        None,
        ["'type' is required", "ftp, ftpsi, ssh, sftp, manager, ldap-directory"],
        id="missing-service-type",
    ),
    pytest.param(
        "[authentications/x]\nname = x\n",
        1,
        "authentications/x",
        None,
        ["'type' is required", "application"],
        id="missing-authentication-type",
    ),
    pytest.param(
        "[server]\nauthentications = DEFAULT-AUTHENTICATION, ldap\n",
        2,
        "server",
        "authentications",
        ["unknown authentication method 'ldap'", "defined: DEFAULT-AUTHENTICATION"],
        id="unknown-authentication-in-server",
    ),
    pytest.param(
        "[services/ftp]\ntype = ftp\nport = 21\nauthentications = nope\n",
        4,
        "services/ftp",
        "authentications",
        ["unknown authentication method 'nope'", "defined: DEFAULT-AUTHENTICATION"],
        id="unknown-authentication-in-service",
    ),
    pytest.param(
        "[server]\nauthentications = a/b\n",
        2,
        "server",
        "authentications",
        ["'a/b' is not an ID", "'/'"],
        id="bad-id-in-list",
    ),
    pytest.param(
        "[accounts/alice]\ngroup = staff\n",
        2,
        "accounts/alice",
        "group",
        ["unknown group 'staff'", "defined: DEFAULT_GROUP"],
        id="unknown-group",
    ),
    pytest.param(
        "[services/one]\ntype = ftp\nport = 2121\n[services/two]\ntype = ssh\nport = 2121\n",
        6,
        "services/two",
        "port",
        ["127.0.0.1:2121 is already used by [services/one]"],
        id="same-address-and-port",
    ),
    pytest.param(
        "[services/ftp]\ntype = ftp\nport = 21\nsecurity_policy = strict\n",
        4,
        "services/ftp",
        "security_policy",
        ["unknown security policy 'strict'", "DEFAULT-SECURITY-POLICY"],
        id="unknown-security-policy",
    ),
    # QA, session 18: ':389' and an LDAP port 0 passed check-config; every login then failed against no server.
    *[
        pytest.param(
            f"[authentications/dir]\ntype = ldap\nbind_dn = dc=example,dc=com\n{option}\n", line, "authentications/dir",
            option.split("\n")[-1].split(" ")[0], [message], id=f"ldap-server-{index}",
        )
        for index, (option, line, message) in enumerate([
            ("address = :389", 4, "':389' names no server"),
            ("address = 127.0.0.1, :3389", 4, "':3389' names no server"),
            ("address = 127.0.0.1:0", 4, "0 is out of range; allowed: 1 to 65535"),
            ("address = 127.0.0.1\nport = 0", 5, "0 is out of range; allowed: 1 to 65535"),
        ])
    ],
    # QA, session 18: int() took '4_7031', '+30', full-width and Arabic-Indic digits as numbers.
    *[
        pytest.param(
            f"[services/ftp]\ntype = ftp\nport = 2121\nmaximum_concurrent_connections = {value}\n", 4, "services/ftp",
            "maximum_concurrent_connections", ["is not a whole number"], id=f"whole-number-{index}",
        )
        for index, value in enumerate(["4_7031", "+30", "\uff13\uff10", "\u0663\u0660", "30.0", "0x1e", " "])
    ],
]


@pytest.mark.parametrize("text, line, section, option, fragments", ERROR_CASES)
def test_each_kind_of_error_names_line_section_option_and_what_is_allowed(text, line, section, option, fragments):
    """Every error names the file, its line, [section], option and what is allowed."""
    problems = problems_of_text(text)
    assert len(problems) == 1, "\n".join(str(p) for p in problems)
    problem = problems[0]
    assert problem.path == PATH
    assert (problem.line, problem.section, problem.option) == (line, section, option)
    for fragment in fragments:
        assert fragment in problem.message
    shown = str(problem)
    assert shown.startswith(f"{PATH}:{line} [{section}]")


def test_duplicate_usernames_are_an_error(password_hash):
    """Two accounts with the same username are refused, naming the first one."""
    problem = only_problem(
        f"""
        [accounts/alice]
        password = {password_hash}
        [accounts/alice2]
        name = alice
        password = {password_hash}
        """
    )
    assert (problem.line, problem.section, problem.option) == (5, "accounts/alice2", "name")
    assert "'alice' is also used by [accounts/alice]" in problem.message


def test_plain_text_password_is_an_error_and_never_shown():
    """A password that is not a hash is an error whose text never contains the password."""
    secret = "Winter2024!plain"
    with pytest.raises(ConfigError) as caught:
        parse(
            f"""
            [accounts/alice]
            password = {secret}
            """
        )
    (problem,) = caught.value.problems
    assert (problem.line, problem.section, problem.option) == (3, "accounts/alice", "password")
    assert "not a password hash" in problem.message
    assert "hash-password" in problem.message
    assert secret not in str(caught.value)
    assert secret not in repr(caught.value.problems)


def test_plain_text_password_from_env_or_file_is_never_shown(tmp_path):
    """A plain-text secret read from env: or file: is never echoed in the error."""
    secret = "Summer2025?plain"
    (tmp_path / "pw").write_text(secret, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        parse(
            """
            [accounts/a]
            password = env:PW
            [accounts/b]
            password = file:pw
            """,
            environ={"PW": secret},
            base_folder=str(tmp_path),
        )
    assert len(caught.value.problems) == 2
    assert secret not in str(caught.value)


def test_malformed_password_line_does_not_echo_the_password():
    """A password line configobj cannot parse (``password: x``) is reported without its value."""
    secret = "Autumn2023#plain"
    with pytest.raises(ConfigError) as caught:
        parse(
            f"""
            [accounts/alice]
            password: {secret}
            """
        )
    assert caught.value.problems[0].line == 3
    assert secret not in str(caught.value)


def test_an_account_that_can_never_log_in_for_its_home_folder_is_a_warning(password_hash):
    """QA: an account whose group has no home_folder_path (and none of its own), or named '.' or 'a/b' with a
    ${USER} home, loaded silently and every login failed. check-config now says so, on the line."""
    configuration = parse(
        f"""
        [groups/bare]
        [groups/homes]
        home_folder_path = /srv/ftp
        [accounts/nohome]
        password = {password_hash}
        group = bare
        [accounts/dot]
        name = .
        password = {password_hash}
        group = homes
        [accounts/slash]
        name = a/b
        password = {password_hash}
        group = bare
        home_folder_path = /srv/own/${{USER}}
        [accounts/fixed]
        name = c/d
        password = {password_hash}
        group = bare
        home_folder_path = /srv/fixed
        [accounts/own]
        password = {password_hash}
        group = bare
        home_folder_path = /srv/own
        """
    )
    found = {(warning.section, warning.option, warning.line): warning.message for warning in configuration.warnings}
    assert set(found) == {("accounts/nohome", "group", 7), ("accounts/dot", "name", 9), ("accounts/slash", "name", 13)}
    assert "[groups/bare] has no home_folder_path" in found[("accounts/nohome", "group", 7)]
    assert "'.' is not a folder name" in found[("accounts/dot", "name", 9)]
    assert "'a/b' contains '/'" in found[("accounts/slash", "name", 13)]
    assert all(message.endswith("this account cannot log in") for message in found.values())


def test_account_names_differing_only_in_composition_are_one_name(password_hash):
    """A composed 'Ü' and 'U' + combining diaeresis are the same login name: two such accounts are an error."""
    problem = only_problem(
        f"[groups/DEFAULT_GROUP]\nhome_folder_path = /srv/ftp\n"
        f"[accounts/one]\nname = \u00dcn\u00ef\npassword = {password_hash}\n"
        f"[accounts/two]\nname = U\u0308n\u00ef\npassword = {password_hash}\n"
    )
    assert (problem.section, problem.option, problem.line) == ("accounts/two", "name", 7)
    assert "also used by [accounts/one]" in problem.message


def test_missing_password_is_a_warning_not_an_error():
    """An account without a password loads, with a warning that it cannot log in."""
    configuration = parse(
        """
        [accounts/alice]
        name = alice
        [groups/DEFAULT_GROUP]
        home_folder_path = /srv/ftp
        """
    )
    (warning,) = configuration.warnings
    assert (warning.line, warning.section, warning.option) == (2, "accounts/alice", "password")
    assert "cannot log in" in warning.message


def test_a_service_whose_every_method_is_disabled_is_a_warning():
    """Every login there would be refused as unknown-user: check-config says so, on the list the service uses."""
    text = """
        [server]
        authentications = PARENT

        [services/ftp]
        type = ftp
        port = 2121

        [services/sftp]
        type = ssh
        port = 2222
        authentications = PARENT, LOCAL

        [authentications/PARENT]
        type = ldap
        enabled = no
        address = 127.0.0.1
        bind_dn = ou=people,dc=example,dc=com

        [authentications/LOCAL]
        type = application
        """
    (warning,) = parse(text).warnings
    assert (warning.line, warning.section, warning.option) == (3, "server", "authentications")
    assert warning.message == "every method [services/ftp] uses is disabled (PARENT): each of its logins is refused"
    disabled_too = text.replace("type = application", "type = application\n        enabled = no")
    warnings = parse(disabled_too).warnings
    assert [(w.section, w.message) for w in warnings] == [
        ("server", "every method [services/ftp] uses is disabled (PARENT): each of its logins is refused"),
        ("services/sftp", "every method [services/sftp] uses is disabled (PARENT, LOCAL): each of its logins is refused"),
    ]
    assert parse(text.replace("enabled = no", "enabled = yes")).warnings == ()


@pytest.mark.parametrize("value", ["", "deny-full-control", "allow-read, deny-full-control"])
def test_a_group_without_any_permission_is_a_warning(value):
    """permissions = (empty) grants nothing, unlike a missing option (full control): check-config says so."""
    configuration = parse(
        f"""
        [groups/readers]
        home_folder_path = /srv
        permissions = {value}
        """
    )
    (warning,) = configuration.warnings
    assert (warning.line, warning.section, warning.option) == (4, "groups/readers", "permissions")
    assert "no permission is granted" in warning.message
    assert configuration.groups["readers"].permissions == frozenset()


def test_disabled_services_may_share_a_port():
    """Only enabled services bind, so a disabled one may reuse another's address and port."""
    configuration = parse(
        """
        [services/one]
        type = ftp
        port = 2121
        [services/two]
        type = ftp
        port = 2121
        enabled = no
        """
    )
    assert set(configuration.services) == {"one", "two"}


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "::"])
def test_wildcard_and_specific_address_on_the_same_port_conflict(wildcard):
    """A service on a wildcard address and another on a specific one cannot share a port: error."""
    problem = only_problem(
        f"""
        [services/public]
        type = ftp
        port = 2121
        address = {wildcard}
        [services/local]
        type = ssh
        port = 2121
        """
    )
    assert (problem.section, problem.option) == ("services/local", "port")


def test_option_outside_any_section_is_an_error():
    """An option before the first [section] is an error naming it."""
    problems = problems_of_text("stray = 1\n[server]\nname = x\n")
    assert len(problems) == 1
    assert problems[0].path == PATH
    assert problems[0].option == "stray"
    assert "outside any [section]" in problems[0].message


def test_option_outside_any_section_names_its_line():
    """The error for an option before the first [section] names that option's line."""
    problems = problems_of_text("\n\nstray = 1\n[server]\nname = x\n")
    assert problems[0].line == 3
    assert str(problems[0]).startswith(f"{PATH}:3")


def test_duplicate_option_is_configobjs_error_with_its_line():
    """An option given twice in a section is reported on the line of the repeat."""
    problems = problems_of_text("[server]\nname = x\n\nname = y\n")
    assert len(problems) == 1
    assert problems[0].line == 4
    assert problems[0].message == "duplicate option, first given on line 2"
    assert (problems[0].section, problems[0].option) == ("server", "name")
    assert str(problems[0]) == f"{PATH}:4 [server] name: duplicate option, first given on line 2"


def test_duplicate_option_names_section_and_option():
    """An option given twice is reported with its [section] and option name."""
    problems = problems_of_text("[server]\nname = x\nname = y\n")
    assert (problems[0].line, problems[0].section, problems[0].option) == (3, "server", "name")


def test_duplicate_section_is_an_error_with_its_line():
    """A section given twice is reported on the line of the repeat."""
    problems = problems_of_text("[groups/g]\nname = x\n[groups/h]\n[groups/g]\nname = y\n")
    assert len(problems) == 1
    assert problems[0].line == 4
    assert problems[0].message == "duplicate section, first given on line 1"
    assert problems[0].section == "groups/g"


def test_duplicate_option_does_not_hide_other_problems():
    """A duplicate option is reported together with the file's other problems."""
    problems = problems_of_text("[server]\nname = x\nname = y\n[services/ftp]\ntype = ftp\nport = 99999\n")
    assert len(problems) == 2


def test_all_problems_of_a_file_are_reported_at_once(password_hash):
    """A file with five distinct problems yields exactly five problems, in one error."""
    text = textwrap.dedent(
        f"""\
        [server]
        authentications = missing-method
        [services/ftp]
        type = ftp
        port = 21
        enabeld = yes
        idle_connection_timeout = -1
        [groups/g]
        permissions = allow-everything
        [accounts/alice]
        group = nogroup
        password = {password_hash}
        """
    )
    problems = problems_of_text(text)
    located = sorted((p.line, p.section, p.option) for p in problems)
    assert located == [
        (2, "server", "authentications"),
        (6, "services/ftp", "enabeld"),
        (7, "services/ftp", "idle_connection_timeout"),
        (9, "groups/g", "permissions"),
        (11, "accounts/alice", "group"),
    ]


def test_sftpplus_server_options_sftpauth_cannot_honour_are_errors_saying_what_to_do():
    """QA (SFTPPlus migration): SFTPPlus's documented [server] sample gave 'unknown option' (for
    manager_authentications: 'did you mean authentications?'), and nothing about what to do instead."""
    found = {
        problem.option: (problem.line, problem.message)
        for problem in problems_of(
            "[server]\nuuid = 530019d0-92ce-11e2-9e96-0800200c9a66\naccount = sftpplus\numask = 022\n"
            "manager_authentications = 65a1-41ce\nssl_cipher_list = HIGH\n"
        )
    }
    assert sorted(found) == ["account", "manager_authentications", "umask"]
    assert found["account"] == (3, "an SFTPPlus option that sftpauth does not take; sftpauth runs as the user that "
                                   "starts it: User= in its systemd unit (etc/sftpauth.service)")
    assert found["umask"][0] == 4 and "UMask= in its systemd unit" in found["umask"][1]
    assert found["manager_authentications"][0] == 5 and "section (type = manager)" in found["manager_authentications"][1]
    unknown = only_problem("[server]\naccounts = x\n").message
    assert "unknown option" in unknown and "umask" not in unknown and "account," not in unknown


@pytest.mark.parametrize(
    "kind, options, instead",
    [("ip-time-ban", "ban_interval = 600\nban_after_count = 3\n", "source_ip_ban_after_count and source_ip_ban_interval"),
     ("Deny-Username", "usernames = root\n", "deny_usernames in [security-policies/DEFAULT-SECURITY-POLICY]")],
)
def test_sftpplus_methods_that_are_security_policies_here_say_so(kind, options, instead):
    """QA (SFTPPlus migration): each of the method's options was an 'unknown option' with a misleading hint."""
    problem = only_problem(f"[authentications/m]\ntype = {kind}\n{options}")
    assert (problem.section, problem.option, problem.line) == ("authentications/m", "type", 2)
    assert problem.message.startswith(f"{kind!r} is an SFTPPlus method that sftpauth does not have; ")
    assert instead in problem.message


def test_known_sftpplus_options_are_warnings_not_errors():
    """SFTPPlus options sftpauth does not implement load with a warning naming each."""
    configuration = parse(
        """
        [server]
        description = the transfer server
        [services/ftp]
        type = ftp
        port = 21
        ssl_cipher_list = HIGH
        [services/ssh]
        type = ssh
        port = 22
        ssh_cipher_list = aes256-ctr
        [services/manager]
        type = manager
        port = 8443
        ssl_cipher_list = HIGH
        ssl_allowed_methods = tlsv1.2
        """
    )
    located = sorted((w.line, w.section, w.option) for w in configuration.warnings)
    assert located == [
        (3, "server", "description"),
        (7, "services/ftp", "ssl_cipher_list"),
        (11, "services/ssh", "ssh_cipher_list"),
        (15, "services/manager", "ssl_cipher_list"),
        (16, "services/manager", "ssl_allowed_methods"),
    ]
    for warning in configuration.warnings:
        assert "not implemented by sftpauth" in warning.message
    assert not hasattr(configuration.server, "description")


def test_service_options_of_another_type_are_errors():
    """An FTP-only option in an SSH service is an unknown option, not silently ignored."""
    problem = only_problem(
        """
        [services/ssh]
        type = ssh
        port = 22
        passive_port_range = 60000-60100
        """
    )
    assert (problem.line, problem.section, problem.option) == (5, "services/ssh", "passive_port_range")
    assert "unknown option" in problem.message


@pytest.mark.parametrize("comment", ["# staff", "; staff", ";staff"])
def test_section_header_with_inline_comment_keeps_line_numbers(comment):
    """Problems in a section whose header has an inline comment ('#' or ';') still name their line."""
    problems = problems_of_text(f"[server]\nname = x\n[groups/g]   {comment}\nenabled = perhaps\n")
    assert [(problem.line, problem.section, problem.option) for problem in problems] == [(4, "groups/g", "enabled")]


# -- load_configuration ----------------------------------------------------------------


def test_load_configuration_reads_the_file_relative_to_its_folder(tmp_path, password_hash):
    """load_configuration resolves relative paths and file: secrets against the file's folder."""
    (tmp_path / "alice.hash").write_text(password_hash, encoding="utf-8")
    config_path = tmp_path / "server.ini"
    config_path.write_text(
        "[server]\naudit_log = audit.jsonl\n[accounts/alice]\npassword = file:alice.hash\n", encoding="utf-8"
    )
    configuration = load_configuration(str(config_path), environ={})
    assert configuration.path == str(config_path)
    assert configuration.server.audit_log == str(tmp_path / "audit.jsonl")
    assert configuration.server.data_folder == str(tmp_path / "data")
    assert configuration.accounts["alice"].password == password_hash


def test_load_configuration_reports_errors_with_the_file_path(tmp_path):
    """Errors from load_configuration name the path as given."""
    config_path = tmp_path / "bad.ini"
    config_path.write_text("[services/ftp]\ntype = ftp\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_configuration(str(config_path), environ={})
    assert str(caught.value) == f"{config_path}:1 [services/ftp] port: required option is missing"


def test_load_configuration_of_a_missing_file(tmp_path):
    """A file that cannot be read is one problem naming the path."""
    missing = tmp_path / "nope.ini"
    with pytest.raises(ConfigError) as caught:
        load_configuration(str(missing))
    (problem,) = caught.value.problems
    assert problem.path == str(missing)
    assert "cannot read the file" in problem.message


def test_load_configuration_of_a_non_utf8_file(tmp_path):
    """A file that is not UTF-8 is one problem, not a traceback."""
    config_path = tmp_path / "latin1.ini"
    config_path.write_bytes(b"[server]\nname = Caf\xe9\n")
    with pytest.raises(ConfigError) as caught:
        load_configuration(str(config_path))
    (problem,) = caught.value.problems
    assert "not UTF-8" in problem.message


def test_load_configuration_uses_the_process_environment(tmp_path, monkeypatch, password_hash):
    """Without an explicit environ, env: secrets come from os.environ."""
    monkeypatch.setenv("SFTPAUTH_TEST_HASH", password_hash)
    config_path = tmp_path / "server.ini"
    config_path.write_text("[accounts/alice]\npassword = env:SFTPAUTH_TEST_HASH\n", encoding="utf-8")
    assert load_configuration(str(config_path)).accounts["alice"].password == password_hash


@pytest.mark.parametrize("address, refused", [("0.0.0.0", True), ("192.0.2.7", True), ("::", True),
                                               ("127.0.0.1", False), ("127.1.2.3", False), ("::1", False),
                                               ("localhost", False)])
def test_the_embedded_directory_listens_on_loopback_only(address, refused):
    """It answers anonymous searches with every userPassword: anything but loopback is an error on its line."""
    text = f"[services/demo-ldap]\ntype = ldap-directory\naddress = {address}\nport = 10389\nldif = d.ldif\n"
    if refused:
        problem = only_problem(text)
        assert (problem.line, problem.option) == (3, "address") and "not a loopback address" in problem.message
    else:
        assert parse(text).services["demo-ldap"].address == address


def test_choices_are_read_in_any_case():
    """``Yes``, ``No``, ``LDAP`` are accepted like yes/no options (SFTPPlus files are not all lower case)."""
    configuration = parse(
        """
        [authentications/directory]
        type = LDAP
        address = 127.0.0.1
        bind_dn = dc=example,dc=com
        secure_connection = No
        bind_dn_type = Parent

        [groups/staff]
        lock_in_home_folder = Yes
        """
    )
    method = configuration.authentications["directory"]
    assert (method.type, method.secure_connection, method.bind_dn_type) == ("ldap", "no", "parent")


@pytest.mark.parametrize("spelling, expected", [("False", "no"), ("off", "no"), ("True", "yes"), ("1", "yes")])
def test_choices_with_yes_or_no_take_every_yes_no_spelling(spelling, expected):
    """QA (SFTPPlus migration): ``secure_connection = False`` was refused where ``enabled = False`` is taken."""
    configuration = parse(
        f"[authentications/directory]\ntype = ldap\naddress = 127.0.0.1\nbind_dn = dc=example,dc=com\n"
        f"secure_connection = {spelling}\n[groups/staff]\nlock_in_home_folder = {'True' if expected == 'yes' else 'yes'}\n"
    )
    assert configuration.authentications["directory"].secure_connection == expected


def test_lock_in_home_folder_false_says_it_is_not_supported_as_written():
    problem = only_problem("[groups/staff]\nlock_in_home_folder = False\n")
    assert "'False' is not supported; the only value is yes" in problem.message


def test_lock_in_home_folder_no_says_it_is_not_supported():
    """Sessions are always locked in their home folder: 'no' is refused with that reason."""
    problem = only_problem("[groups/staff]\nlock_in_home_folder = no\n")
    assert (problem.section, problem.option) == ("groups/staff", "lock_in_home_folder")
    assert "'no' is not supported; the only value is yes" in problem.message


def test_an_indented_option_is_an_error_not_a_line_of_the_value_above():
    """``    search_filter = ...`` under bind_dn would have been a base DN line, and the filter lost."""
    found = problems_of(
        "[authentications/directory]\n"  # 1
        "type = ldap\n"  # 2
        "address = 127.0.0.1\n"  # 3
        "bind_dn =\n"  # 4
        "    ou=people,dc=example,dc=com\n"  # 5
        "    search_filter = (memberOf=cn=ftp,dc=example,dc=com)\n"  # 6
    )
    assert [(p.line, p.section, p.option) for p in found] == [(6, "authentications/directory", "search_filter")]
    assert "indented" in found[0].message and "bind_dn" in found[0].message


def test_an_empty_username_attribute_is_an_error_with_its_line():
    """Empty, every search would be ``(=alice)`` and every BIND DN ``=alice,...``: no login could ever work."""
    problem = only_problem(
        "[authentications/directory]\n"  # 1
        "type = ldap\n"  # 2
        "address = 127.0.0.1\n"  # 3
        "bind_dn = ou=people,dc=example,dc=com\n"  # 4
        "username_attribute =\n"  # 5
        "email_attribute =\n"  # 6: empty is allowed, it means the address is not read
    )
    assert (problem.line, problem.section, problem.option) == (5, "authentications/directory", "username_attribute")
    assert "is empty" in problem.message and "default" in problem.message


def test_base_dn_lines_with_equal_signs_are_values():
    """DN lines (``ou=a,dc=b``) and rules stay value lines."""
    configuration = parse(
        """
        [authentications/directory]
        type = ldap
        address = 127.0.0.1
        bind_dn =
            ou=people,dc=example,dc=com
            name=x,dc=example,dc=com
        """
    )
    assert len(configuration.authentications["directory"].bind_dn) == 2


def test_an_error_in_a_method_is_not_repeated_as_an_unknown_method_or_a_missing_password():
    """type = ldapp and a missing env: secret give one error each, not a cascade in other sections."""
    found = problems_of(
        "[server]\n"  # 1
        "authentications = directory\n"  # 2
        "[authentications/directory]\n"  # 3
        "type = ldapp\n"  # 4
        "[authentications/other]\n"  # 5
        "type = ldap\n"  # 6
        "address = 127.0.0.1\n"  # 7
        "bind_dn = dc=example,dc=com\n"  # 8
        "service_account_dn = cn=reader,dc=example,dc=com\n"  # 9
        "service_account_password = env:SFTPAUTH_TEST_NOT_SET\n"  # 10
    )
    assert [(p.line, p.section, p.option) for p in found] == [
        (4, "authentications/directory", "type"),
        (10, "authentications/other", "service_account_password"),
    ]


# -- what an editor or a slip of the keyboard puts in a file ------------------------


def test_a_utf8_byte_order_mark_is_accepted():
    """Windows editors put a BOM before UTF-8 text: the first [section] is still a section."""
    configuration = parse_configuration("\ufeff[server]\nname = From Notepad\n", PATH, BASE, {})
    assert configuration.server.name == "From Notepad"


def test_a_secret_file_that_is_not_utf8_is_a_problem_on_its_line(tmp_path):
    """file: naming a binary or Latin-1 file is the option's error, not a traceback."""
    (tmp_path / "binary.pw").write_bytes(b"secret\xff\n")
    problems = problems_of("[server]\nname = x\n[accounts/bob]\npassword = file:binary.pw\n", base_folder=str(tmp_path))
    (problem,) = [problem for problem in problems if problem.option == "password"]
    assert (problem.line, problem.section) == (4, "accounts/bob")
    assert "is not UTF-8 text (byte 7)" in problem.message


@pytest.mark.parametrize(
    "text, section, option",
    [
        ("[services/ftp]\ntype = ftp\nport = 2121\nbanner = Welcome\n    to the server\n", "services/ftp", "banner"),
        ("[authentications/A]\ntype = ldap\naddress = h\nbind_dn = dc=x\n"
         "service_account_password = one\n  two\n", "authentications/A", "service_account_password"),
        ("[server]\nname = one\n  two\n", "server", "name"),
        ("[services/ftp]\ntype = ftp\nport = 2121\n  2122\n", "services/ftp", "port"),
    ],
    ids=["banner", "password", "text", "port"],
)
def test_an_indented_line_under_a_one_value_option_is_an_error(text, section, option):
    """Joined to the value with a line break, it would send a two-line FTP banner or a password nobody types."""
    problem = only_problem(text)
    assert (problem.section, problem.option, problem.line) == (section, option, text.count("\n") - 1)
    assert "takes one value on one line" in problem.message


@pytest.mark.parametrize(
    "text, line, section, option, message",
    [
        ('[server]\nname = x\n\n[services/f]\ntype = ftp\nbanner = "unterminated\nport = 2121\n',
         6, "services/f", "banner", "the quotes of the value do not match"),
        ('[server]\nname = """never closed\n', 2, "server", "name", "the triple-quoted value never ends"),
        ("[server]\nname = x\n[services/f]]\ntype = ftp\n", 3, "services/f", None, "single brackets"),
    ],
    ids=["quote", "triple-quote", "brackets"],
)
def test_what_configobj_cannot_read_is_placed_and_explained(text, line, section, option, message):
    """configobj's own errors get the section, the option and what to do, like every other problem."""
    problem = only_problem(text)
    assert (problem.line, problem.section, problem.option) == (line, section, option)
    assert message in problem.message


def test_a_line_configobj_cannot_read_does_not_hide_the_other_problems():
    """A line without '=', an unmatched quote and a section line with a typo are reported with everything else."""
    problems = problems_of(
        "[server]\nName = x\nthis line has no equals\n[groups/g]\npermissions = allow-read, allow-lst\n"
        'banner = "abc\n[services/f]]\ntype = ftp\n[groups/h]\nnamex = 1\n'
    )
    assert [(p.line, p.section, p.option) for p in problems] == [
        (2, "server", "Name"),
        (3, "server", None),
        (5, "groups/g", "permissions"),
        (6, "groups/g", "banner"),
        (7, "services/f", None),  # its option type = ftp is not checked: it is in no usable section
        (10, "groups/h", "namex"),
    ]


def test_problems_are_listed_in_the_order_of_the_lines():
    """Checks of references between sections run last; their problems still come in line order."""
    problems = problems_of("[services/f]\ntype = ftp\nport = 0\nauthentications = NOSUCH\n[groups/g]\nnamex = 1\n")
    assert [(p.line, p.option) for p in problems] == [(4, "authentications"), (6, "namex")]


def test_a_file_that_is_not_utf8_names_each_line_section_and_option(tmp_path):
    path = tmp_path / "latin1.ini"
    path.write_bytes(b"[server]\n\n\nname = caf\xe9\n[groups/g]\npermissions = allow-read\n\xff\n")
    with pytest.raises(ConfigError) as caught:
        load_configuration(str(path), environ={})
    assert [(p.line, p.section, p.option) for p in caught.value.problems] == [(4, "server", "name"), (7, "groups/g", None)]
    assert "byte 0xe9 is not UTF-8" in caught.value.problems[0].message


LDAP_WITH_SECRET = (
    "[authentications/d]\ntype = ldap\naddress = 127.0.0.1\nbind_dn = dc=example,dc=com\n{enabled}"
    "service_account_dn = cn=svc,dc=example,dc=com\nservice_account_password = {secret}\n"
)


def test_an_empty_secret_names_its_variable_or_file(tmp_path):
    (tmp_path / "empty.txt").write_text("\n")
    problem = only_problem(LDAP_WITH_SECRET.format(enabled="", secret="env:EMPTY"), {"EMPTY": ""})
    assert (problem.option, problem.message) == ("service_account_password", "environment variable 'EMPTY' is set but empty")
    problem = only_problem(LDAP_WITH_SECRET.format(enabled="", secret=f"file:{tmp_path}/empty.txt"))
    assert problem.message == f"secret file '{tmp_path}/empty.txt' is empty"


def test_a_missing_secret_is_a_warning_in_a_disabled_section_only():
    problem = only_problem(LDAP_WITH_SECRET.format(enabled="", secret="env:NOT_SET"))
    assert problem.message == "environment variable 'NOT_SET' is not set"
    for spelling in ("no", '"No"', "disabled", "off"):  # as enabled itself is read
        configuration = parse(LDAP_WITH_SECRET.format(enabled=f"enabled = {spelling}\n", secret="env:NOT_SET"))
        assert configuration.authentications["d"].enabled is False
        assert [(w.option, w.line) for w in configuration.warnings] == [("service_account_password", 7)]
        assert "not needed while the section has enabled = no" in configuration.warnings[0].message


def test_a_data_folder_that_is_a_file_is_an_error(tmp_path):
    """check-config said "valid" and the start failed on the generated host keys."""
    (tmp_path / "hostname").write_text("x\n")
    problem = only_problem(f"[server]\ndata_folder = {tmp_path}/hostname\n")
    assert (problem.section, problem.option, problem.line) == ("server", "data_folder", 2)
    assert "is a file, not a folder" in problem.message


@pytest.mark.parametrize("address", ["999.1.1.1", "10.0.0", "1.2.3.4.5"])
def test_an_address_of_digits_and_dots_must_be_ipv4(address):
    """Read as a host name it passed check-config and failed at start with a DNS error."""
    problem = only_problem(f"[services/ftp]\ntype = ftp\nport = 2121\naddress = {address}\n")
    assert (problem.option, problem.line) == ("address", 4)
    assert "is not an IP address or host name" in problem.message


@pytest.mark.parametrize(
    "addresses",
    [
        "127.0.0.1:3389, 127.0.0.1:3389",
        "ldap.example.com, LDAP.example.com",
        # QA, session 18: one server written two ways (the default port, IPv6 forms, a leading zero)
        "127.0.0.1, 127.0.0.1:389",
        "[::1]:389, ::1",
        "127.0.0.1:0389, 127.0.0.1",
        "::1, 0:0:0:0:0:0:0:1",
        "::ffff:127.0.0.1, 127.0.0.1",
    ],
)
def test_an_ldap_server_listed_twice_is_an_error(addresses):
    """QA: check-config said valid, failover tried the server twice and /health counted it twice."""
    problem = only_problem(f"[authentications/dir]\ntype = ldap\nbind_dn = dc=example,dc=com\naddress = {addresses}\n")
    assert (problem.section, problem.option, problem.line) == ("authentications/dir", "address", 4)
    assert "is listed twice" in problem.message


@pytest.mark.parametrize(
    "addresses, expected",
    [
        ("127.0.0.1, 127.0.0.1:3389", (("127.0.0.1", None), ("127.0.0.1", 3389))),
        # Two TLS identities of one server (a certificate may name one only): both may be listed.
        ("localhost, 127.0.0.1", (("localhost", None), ("127.0.0.1", None))),
    ],
)
def test_ldap_servers_on_other_ports_or_names_are_not_listed_twice(addresses, expected):
    configuration = parse(f"[authentications/dir]\ntype = ldap\nbind_dn = dc=example,dc=com\naddress = {addresses}\n")
    assert configuration.authentications["dir"].address == expected


@pytest.mark.parametrize("address, hint", [("::1:389", "[::1]:389"), ("fe80::1:636", "[fe80::1]:636")])
def test_an_ipv6_ldap_server_with_a_port_needs_brackets(address, hint):
    """QA, session 26: ``::1:389`` passed check-config as host ::1:389 on port 389, never the intended ::1."""
    problem = only_problem(f"[authentications/dir]\ntype = ldap\nbind_dn = dc=example,dc=com\naddress = {address}\n")
    assert (problem.section, problem.option, problem.line) == ("authentications/dir", "address", 4)
    assert f"write {hint} for port" in problem.message and f"or [{address}] for that address" in problem.message


@pytest.mark.parametrize(
    "address, expected",
    [("[::1:389]", ("::1:389", None)), ("[::1]:389", ("::1", 389)), ("2001:db8::1", ("2001:db8::1", None)),
     ("2001:db8::10", ("2001:db8::10", None))],
)
def test_an_ipv6_ldap_server_in_brackets_or_without_a_port_like_ending_is_taken(address, expected):
    configuration = parse(f"[authentications/dir]\ntype = ldap\nbind_dn = dc=example,dc=com\naddress = {address}\n")
    assert configuration.authentications["dir"].address == (expected,)


@pytest.mark.parametrize("first, second", [("localhost", "127.0.0.1"), ("::ffff:127.0.0.1", "127.0.0.1"), ("::1", "localhost")])
def test_two_services_on_one_address_written_two_ways_clash(first, second):
    """QA, session 18: check-config said valid and twistd then could not listen."""
    problem = only_problem(
        f"[services/a]\ntype = ftp\nport = 2121\naddress = {first}\n[services/b]\ntype = ftp\nport = 2121\naddress = {second}\n"
    )
    assert (problem.section, problem.option) == ("services/b", "port")
    assert "is already used by [services/a]" in problem.message


def test_a_quoted_option_name_is_that_option():
    """``"banner" = a#b`` is the banner, read as unquoted names are (whole, "#" kept): never the preprocessing marker."""
    configuration = parse('[services/ftp]\ntype = ftp\nport = 2121\n"banner" = Hello#1 here\n')
    assert configuration.services["ftp"].banner == "Hello#1 here"


def test_a_quoted_option_name_is_reported_on_its_own_line():
    """An unknown quoted name, and a quoted repeat of an option, name their own lines."""
    unknown = problems_of('[services/ftp]\ntype = ftp\nport = 2121\n"ban ner" = x\n')
    assert [(p.line, p.option) for p in unknown] == [(4, "ban ner")]
    repeated = only_problem('[services/ftp]\ntype = ftp\nport = 2121\nbanner = a\n"banner" = b\n')
    assert (repeated.line, repeated.option) == (5, "banner") and "duplicate option" in repeated.message


def test_a_bad_base_dn_is_one_error_not_also_a_missing_one():
    """A bind_dn that is not a DN is reported once; "at least one base DN is required" would send the reader astray."""
    problem = only_problem(
        "[authentications/directory]\ntype = ldap\naddress = 127.0.0.1\nbind_dn = not a dn\n"
    )
    assert (problem.line, problem.option) == (4, "bind_dn") and "is not a distinguished name" in problem.message


# -- files written for SFTPPlus ------------------------------------------------------------


@pytest.mark.parametrize("value", ["Inherit", "inherit", "INHERIT"])
def test_an_account_home_folder_path_of_inherit_is_the_groups(value, password_hash):
    """SFTPPlus's ``home_folder_path = Inherit`` on an account means its group's, not a folder named Inherit."""
    configuration = parse(
        f"""
        [groups/DEFAULT_GROUP]
        home_folder_path = /srv/ftp
        [accounts/john]
        password = {password_hash}
        home_folder_path = {value}
        """
    )
    assert configuration.accounts["john"].home_folder_path == ""


def test_sftpplus_type_lines_of_groups_and_accounts_are_accepted(password_hash):
    """``type = group`` and ``type = application``, as SFTPPlus writes them, load (in any case)."""
    configuration = parse(
        f"""
        [groups/DEFAULT_GROUP]
        type = group
        home_folder_path = /srv/ftp
        [groups/staff]
        type = Group
        home_folder_path = /srv/staff
        [accounts/john]
        type = application
        password = {password_hash}
        group = staff
        """
    )
    assert configuration.accounts["john"].group == ("staff",)
    assert set(configuration.groups) == {"DEFAULT_GROUP", "staff"}


def test_sftpplus_role_of_an_administrator_is_its_roles(password_hash):
    """SFTPPlus's ``[administrators/..] role = ID`` gives the administrator that role, as ``roles`` does."""
    configuration = parse(
        f"""
        [roles/auditors]
        permissions = configuration, read
        [administrators/sa]
        name = sa-admin
        password = {password_hash}
        role = auditors
        """
    )
    assert configuration.administrators["sa"].roles == ("auditors",)


SFTPPLUS_ERROR_CASES = [
    pytest.param(
        "[accounts/mike]\ntype = os\n",
        2,
        "accounts/mike",
        "type",
        ["'os' is not supported; the only value is application"],
        id="operating-system-account",
    ),
    pytest.param(
        "[administrators/sa]\nrole = auditors\n",
        2,
        "administrators/sa",
        "role",
        ["unknown role 'auditors'", "DEFAULT-ROLE"],
        id="unknown-role-given-as-role",
    ),
    pytest.param(
        "[roles/auditors]\n[administrators/sa]\nroles = DEFAULT-ROLE\nrole = auditors\n",
        4,
        "administrators/sa",
        "role",
        ["role and roles are the same option: give roles only"],
        id="role-and-roles",
    ),
    pytest.param(
        "[services/m]\ntype = manager\nport = 8443\nheader_authentication = yes\ntrusted_proxies = 10.0.0.1\n"
        "header_authentication_role = ops\n[roles/ops]\nenabled = no\n",
        6,
        "services/m",
        "header_authentication_role",
        ["[roles/ops] is disabled", "name an enabled role"],
        id="pre-authentication-with-a-disabled-role",
    ),
    pytest.param(
        "[services/m]\ntype = manager\nport = 8443\nheader_authentication = yes\ntrusted_proxies = 10.0.0.1\n"
        "header_authentication_role = ops\n[roles/ops]\nsource_ip_filter = 10.1.0.0/16\n",
        6,
        "services/m",
        "header_authentication_role",
        ["[roles/ops] has a source_ip_filter", "sees the proxy's address", "filter at the proxy"],
        id="pre-authentication-with-a-filtered-role",
    ),
    pytest.param(
        "[roles/ops]\nsource_ip_filter = 10.1.0.0/16, office\n",
        2,
        "roles/ops",
        "source_ip_filter",
        ["office"],
        id="role-source-ip-filter-not-an-address",
    ),
]


@pytest.mark.parametrize("text, line, section, option, fragments", SFTPPLUS_ERROR_CASES)
def test_sftpplus_spellings_sftpauth_cannot_read_are_placed_errors(text, line, section, option, fragments):
    """What an SFTPPlus file says that sftpauth cannot do is an error on its own line, naming what to write."""
    test_each_kind_of_error_names_line_section_option_and_what_is_allowed(text, line, section, option, fragments)


@pytest.mark.parametrize("value", ["0 - 0", "0-0"])
def test_a_passive_port_range_of_zeros_is_any_free_port(value):
    """SFTPPlus's ``passive_port_range = 0 - 0`` (random ports) is the default: any port the system gives."""
    configuration = parse(f"[services/ftp]\ntype = ftp\nport = 21\npassive_port_range = {value}\n")
    assert configuration.services["ftp"].passive_port_range is None


def test_an_empty_service_address_is_refused_not_every_interface():
    """``address =`` listened on every IPv4 address while a missing one is 127.0.0.1: an empty value is an error."""
    problem = only_problem("[services/ftp]\ntype = ftp\nport = 2121\naddress =\n")
    assert (problem.line, problem.option) == (4, "address") and "0.0.0.0 for every IPv4 address" in problem.message
    assert parse("[services/ftp]\ntype = ftp\nport = 2121\n").services["ftp"].address == "127.0.0.1"
    assert parse("[services/ftp]\ntype = ftp\nport = 2121\naddress = ::\n").services["ftp"].address == "::"


def test_sftpplus_default_group_as_documented_loads_and_warns_only_what_sftpauth_ignores(password_hash):
    """SFTPPlus's documented DEFAULT_GROUP: OS owners, SSH keys "Disabled" and no certificates are what sftpauth does."""
    configuration = parse(
        f"""
        [groups/DEFAULT_GROUP]
        enabled = Yes
        description = Default group for all accounts.
        lock_in_home_folder = Yes
        home_folder_path = /srv/partners/${{USER}}
        create_home_folder = No
        create_home_folder_owner = ${{DEFAULT_OS_USER}}
        create_home_folder_group = ${{DEFAULT_OS_GROUP}}
        ssh_authorized_keys_path = Disabled
        allow_certificate_authentication = No
        [accounts/john]
        type = application
        password = {password_hash}
        home_folder_path = Inherit
        ssh_authorized_keys_path = Inherit
        """
    )
    assert [(w.line, w.option) for w in configuration.warnings] == [(4, "description")]
    assert configuration.groups["DEFAULT_GROUP"].home_folder_path == "/srv/partners/${USER}"


def test_sftpplus_options_asking_for_what_sftpauth_lacks_are_warned_on_their_lines(password_hash):
    """SSH keys, client certificates or another owner for new home folders: accepted (SPEC), each warned on its line."""
    configuration = parse(
        f"""
        [groups/partners]
        home_folder_path = /srv/partners
        ssh_authorized_keys_path = /etc/sftpauth/keys/${{USER}}
        allow_certificate_authentication = Yes
        [accounts/john]
        password = {password_hash}
        group = partners
        create_home_folder_owner = john
        create_home_folder_group = partners
        """
    )
    located = [(w.line, w.section, w.option) for w in configuration.warnings]
    assert located == [
        (4, "groups/partners", "ssh_authorized_keys_path"),
        (5, "groups/partners", "allow_certificate_authentication"),
        (9, "accounts/john", "create_home_folder_owner"),
        (10, "accounts/john", "create_home_folder_group"),
    ]
    assert all("not implemented by sftpauth: ignored" in w.message for w in configuration.warnings)


def test_a_roles_source_ip_filter_is_read():
    """SFTPPlus's [roles/..] source_ip_filter: addresses and CIDRs, as a security policy's."""
    configuration = parse("[roles/ops]\nsource_ip_filter = 10.1.0.0/16, 192.0.2.7\n")
    assert [str(network) for network in configuration.roles["ops"].source_ip_filter] == ["10.1.0.0/16", "192.0.2.7/32"]
    assert configuration.roles["DEFAULT-ROLE"].source_ip_filter == ()


@pytest.mark.parametrize(
    "value, quote", [('"Acme", "Corp"', '"'), ("'It''s'", "'"), ('"pa"ss"', '"')], ids=["two-quoted", "doubled", "inside"]
)
def test_a_quoted_value_holding_its_own_quote_is_an_error_not_a_guess(value, quote):
    """configobj leaves quoted values to us; 'Acme", "Corp' (the old reading) was nobody's intent."""
    problem = only_problem(f"[server]\nname = {value}\n")
    assert (problem.line, problem.option) == (2, "name")
    assert f"holds its own quote character {quote}" in problem.message
    assert parse("[server]\nname = 'Acme \"the\" Corp'\n").server.name == 'Acme "the" Corp'


# -- one error per mistake (QA, session 18) ------------------------------------------------


@pytest.mark.parametrize("type_line", ["type = ldapp\n", ""])
def test_a_section_without_a_usable_type_still_names_its_unknown_options(type_line):
    """'type = ldapp' hid 'adress' and 'bogus': the options of no type at all are reported anyway."""
    problems = problems_of(f"[authentications/dir]\n{type_line}adress = 127.0.0.1\nbind_dn = dc=example,dc=com\nbogus = 1\n")
    where = [(problem.option, problem.line) for problem in problems]
    first = 2 if type_line else 1
    assert where == ([("type", 2)] if type_line else [(None, 1)]) + [("adress", first + 1), ("bogus", first + 3)]
    assert "did you mean 'address'?" in problems[-2].message


@pytest.mark.parametrize(
    "options, option",
    [
        ("group_search_base = notadn\ngroup_search_filter = (member={dn})\nnested_groups = yes\n", "group_search_base"),
        ("group_search_base = ou=groups,dc=example,dc=com\ngroup_search_filter = (member={dn}\n", "group_search_filter"),
        ("bind_dn = notadn\n", "bind_dn"),
    ],
)
def test_a_refused_value_is_not_also_called_missing(options, option):
    """QA: a bad group_search_base also gave 'required when group_search_filter is set' and '... nested_groups'."""
    base = "" if option == "bind_dn" else "bind_dn = dc=example,dc=com\n"
    problem = only_problem(f"[authentications/dir]\ntype = ldap\naddress = 127.0.0.1\n{base}{options}")
    assert problem.option == option
    assert "required" not in problem.message


@pytest.mark.parametrize("kind", ["accounts", "administrators"])
def test_an_empty_env_password_is_one_error_and_no_warning(kind):
    """QA: 'env:NAME set but empty' came with the warning 'no password is set', which contradicts it."""
    extra = "roles = DEFAULT-ROLE\n" if kind == "administrators" else "home_folder_path = /srv/bob\n"
    with pytest.raises(ConfigError) as caught:
        parse(f"[{kind}/bob]\n{extra}password = env:EMPTY\n", {"EMPTY": ""})
    [problem] = caught.value.problems
    assert (problem.section, problem.option) == (f"{kind}/bob", "password")
    assert "set but empty" in problem.message
    assert [warning for warning in caught.value.warnings if warning.section == f"{kind}/bob"] == []


def test_sftp_no_is_a_configuration_warning():
    """QA: the warning came from the running service only, so check-config said nothing of it."""
    configuration = parse("[services/ssh]\ntype = ssh\nport = 2222\nsftp = no\n[services/off]\ntype = ssh\nport = 2223\nsftp = no\nenabled = no\n")
    assert [(w.section, w.option, w.message) for w in configuration.warnings] == [
        ("services/ssh", "sftp", "no: clients can log in but not transfer files")
    ]


@pytest.mark.parametrize("written", ["memory", "Memory", "MEMORY", '"memory"'])
def test_state_memory_in_any_case(written):
    """QA, session 18: 'state = Memory' was refused, though the words of a choice are taken in any case."""
    assert parse(f"[server]\nstate = {written}\n").server.state == "memory"


def test_every_bad_item_of_a_list_is_reported_on_its_own_line():
    """Each mistake of a multi-line or comma list is an error on its own line: one check finds them all."""
    text = textwrap.dedent("""\
        [authentications/LDAP]
        type = ldap
        address =
            ldap1.example.com:389
            :389
            ldap2.example.com:99999
        bind_dn_type = parent
        bind_dn =
            ou=people,dc=example,dc=com
            not a dn
            ou=staff,dc=example,dc=com
            =nameless,dc=com
        group_mapping =
            memberOf, cn=ftp*, ftp
            memberOf
            cn, x, y, bad/group
            9bad, x, ftp

        [groups/ftp]
        name = ftp

        [security-policies/DEFAULT-SECURITY-POLICY]
        deny_usernames =
            root
            m/(unclosed/
            admin
            m/[z-a]/

        [services/manager]
        type = manager
        port = 8443
        trusted_proxies = 10.0.0.1, 10.0.0.300, 2001:db8::/32, proxy.example.com
        """)
    found = {(problem.line, problem.option) for problem in problems_of_text(text)}
    assert found == {
        (5, "address"), (6, "address"),
        (10, "bind_dn"), (12, "bind_dn"),
        (15, "group_mapping"), (16, "group_mapping"), (17, "group_mapping"),
        (25, "deny_usernames"), (27, "deny_usernames"),
        (32, "trusted_proxies"),
    }
    proxies = [problem.message for problem in problems_of_text(text) if problem.option == "trusted_proxies"]
    assert len(proxies) == 2 and "'10.0.0.300'" in proxies[0] and "'proxy.example.com'" in proxies[1]


def test_spaces_around_a_section_id_are_not_part_of_it():
    """``[authentications/ LDAP]`` is the section LDAP: ``authentications = LDAP`` finds it, and a second one is a duplicate."""
    text = ("[server]\nauthentications = LDAP\n\n[authentications / LDAP ]\ntype = ldap\naddress = 127.0.0.1\n"
            "bind_dn = ou=people,dc=example,dc=com\n\n[groups/ ftp]\nname = FTP\n")
    configuration = parse(text)
    assert list(configuration.server.authentications) == ["LDAP"]
    assert "LDAP" in configuration.authentications and "ftp" in configuration.groups
    (problem,) = problems_of_text(text + "[authentications/LDAP]\ntype = ldap\n")
    assert (problem.line, problem.section) == (11, "authentications/LDAP")
    assert problem.message.startswith("duplicate section, first given on line 4")


def test_home_folder_variables_other_than_user_are_a_warning(password_hash):
    """Only ${USER} is replaced in a home folder path: ${USERNAME}, $USER or ${user} would be folder names as written."""
    configuration = parse(
        "[groups/g1]\nhome_folder_path = /srv/${USERNAME}\n\n"
        "[groups/g2]\nhome_folder_path = /srv/$USER/files\n\n"
        "[groups/g3]\nhome_folder_path = /srv/${user}\n\n"
        "[groups/g4]\nhome_folder_path = /srv/${USER}/in\n\n"
        f"[accounts/a]\nname = a\npassword = {password_hash}\nhome_folder_path = /data/${{HOME}}\n"
    )
    found = {(w.line, w.section, w.option): w.message for w in configuration.warnings}
    assert set(found) == {(2, "groups/g1", "home_folder_path"), (5, "groups/g2", "home_folder_path"),
                          (8, "groups/g3", "home_folder_path"), (16, "accounts/a", "home_folder_path")}
    assert found[(2, "groups/g1", "home_folder_path")].startswith("${USERNAME} is not replaced: the only placeholder is ${USER}")
    assert "$USER is not replaced (did you mean ${USER}?)" in found[(5, "groups/g2", "home_folder_path")]
    assert "${user} is not replaced (did you mean ${USER}?)" in found[(8, "groups/g3", "home_folder_path")]


@pytest.mark.parametrize("bind_type", ["parent", "search", "relative"])
def test_a_username_suffix_that_no_bind_uses_is_a_warning(bind_type):
    """QA (SFTPPlus migration): ``username_suffix`` with ``parent`` was never used, and nothing said so."""
    configuration = parse(
        f"[authentications/dir]\ntype = ldap\nbind_dn_type = {bind_type}\nbind_dn = dc=example,dc=com\n"
        "username_suffix = @example.com\naddress = 127.0.0.1\n"
    )
    found = [(w.line, w.section, w.option, w.message) for w in configuration.warnings]
    assert found == [(5, "authentications/dir", "username_suffix", "ignored: it is added to the bind name for "
                      f"bind_dn_type = direct-username only, and this method has bind_dn_type = {bind_type}")]
    direct = parse("[authentications/dir]\ntype = ldap\nbind_dn_type = direct-username\nbind_dn = dc=example,dc=com\n"
                   "username_suffix = @example.com\naddress = 127.0.0.1\n")
    assert direct.warnings == ()


@pytest.mark.parametrize(
    "address, passive, message",
    [("::1", "203.0.113.5", "203.0.113.5 is IPv4, and this service listens on ::1 only"),
     ("127.0.0.1", "2001:db8::5", "2001:db8::5 is IPv6: PASV can announce only an IPv4 address"),
     ("::", "2001:db8::5", "2001:db8::5 is IPv6: PASV can announce only an IPv4 address")],
)
def test_a_passive_address_clients_could_not_use_is_an_error(address, passive, message):
    """QA, session 26 (IPv6): PASV announced the IPv4 address while the ports were listened for on ::1 only."""
    problem = only_problem(f"[services/ftp]\ntype = ftp\nport = 2121\naddress = {address}\npassive_address = {passive}\n")
    assert (problem.section, problem.option, problem.line) == ("services/ftp", "passive_address", 5)
    assert problem.message.startswith(message)


@pytest.mark.parametrize(
    "address, passive, taken",
    [("::", "203.0.113.5", "203.0.113.5"), ("0.0.0.0", "203.0.113.5", "203.0.113.5"),
     ("::1", "ftp.example.com", "ftp.example.com"),
     ("127.0.0.1", "::ffff:203.0.113.5", "::ffff:cb00:7105")],  # IPv4-mapped, as ipaddress writes it; PASV announces IPv4
)
def test_a_passive_address_clients_can_use_is_taken(address, passive, taken):
    configuration = parse(f"[services/ftp]\ntype = ftp\nport = 2121\naddress = {address}\npassive_address = {passive}\n")
    assert configuration.services["ftp"].passive_address == taken


def test_ftps_options_on_a_plain_ftp_service_are_warnings_on_their_lines():
    """Forcing TLS on a service without a certificate changes nothing: the administrator hears that passwords go in clear."""
    configuration = parse(
        "[services/ftp]\ntype = ftp\nport = 21\n"
        "ftps_force_secured_command_channel = yes\nftps_force_secured_data_channel = no\n"
        "[services/off]\ntype = ftp\nport = 2121\nssl_certificate = /etc/cert.pem\nftps_explicit_enabled = no\n"
        "[services/plain]\ntype = ftp\nport = 2221\n"
    )
    found = [(w.line, w.section, w.option, w.message) for w in configuration.warnings]
    assert [entry[:3] for entry in found] == [
        (4, "services/ftp", "ftps_force_secured_command_channel"),
        (10, "services/off", "ftps_explicit_enabled"),
    ]
    assert found[0][3].startswith("ignored: without ssl_certificate this service speaks plain FTP and passwords")
    assert found[1][3].startswith("no: ssl_certificate is not used, this service speaks plain FTP")


def test_unknown_ids_of_good_mapping_rules_are_reported_beside_the_bad_rules():
    """A bad rule does not hide an unknown group or role ID named by a good one: one check-config finds both."""
    text = textwrap.dedent("""\
        [authentications/LDAP]
        type = ldap
        address = 127.0.0.1
        bind_dn = ou=people,dc=example,dc=com
        group_mapping =
            memberOf, *x*, nosuchgroup
            memberOf, x/abc/, DEFAULT_GROUP
            memberOf, m/(unclosed/, DEFAULT_GROUP
            memberOf, *z*, othermissing
        roles_mapping =
            memberOf, *a*, nosuchrole
            memberOf, m/(unclosed/, DEFAULT-ROLE
        """)
    found = [(problem.line, problem.option, problem.message) for problem in problems_of_text(text)]
    assert [entry[:2] for entry in found] == [
        (6, "group_mapping"), (7, "group_mapping"), (8, "group_mapping"), (9, "group_mapping"),
        (11, "roles_mapping"), (12, "roles_mapping"),
    ]
    assert "'nosuchgroup'" in found[0][2] and "'othermissing'" in found[3][2] and "'nosuchrole'" in found[4][2]


def test_a_missing_or_wrong_required_option_does_not_hide_the_sections_other_problems():
    """``port = 21x`` or no ``address``: the section's references are still checked in the same pass."""
    text = textwrap.dedent("""\
        [services/ftp]
        type = ftp
        port = 21x
        security_policy = NOPE
        authentications = NOPE2
        [authentications/L]
        type = ldap
        bind_dn = ou=people,dc=example,dc=com
        group_mapping = nosuch
        [services/ssh]
        type = ssh
        authentications = L
        """)
    found = [(problem.line, problem.option) for problem in problems_of_text(text)]
    assert found == [(3, "port"), (4, "security_policy"), (5, "authentications"), (6, "address"),
                     (9, "group_mapping"), (10, "port")]
