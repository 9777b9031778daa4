"""LDAP extensions: entry points, JSON configuration errors, and the three hooks as a third party writes them."""

from __future__ import annotations

import sys
import textwrap

import pytest
from twisted.internet import task

from sftpauth.auth.credentials import LoginRequest
from sftpauth.auth.ldap.extensions import (
    ExtensionEntryPoint,
    load_extension,
    parse_extension_configuration,
    resolve_entry_point,
)
from sftpauth.auth.ldap.totp import AugmentedTOTP
from sftpauth.auth.trace import Trace
from sftpauth.cli import main
from sftpauth.config.errors import ConfigError
from sftpauth.config.loader import load_configuration
from sftpauth.state import MemoryReplayStore, SharedState

from ldap_fake import PEOPLE, SERVICE_DN, FakeDirectory, configuration, make_method, run

ALICE_DN = f"uid=alice,{PEOPLE}"

# What a third party would write (docs/extensions.rst): a password suffix "#DEPT"
# that must match the entry's departmentNumber, read as the service account.
DEPARTMENT_EXTENSION = '''
from twisted.internet import defer

from sftpauth.auth.errors import LoginFailed
from sftpauth.auth.ldap.client import Entry

CALLS = []


class Department:
    def __init__(self, configuration):
        if "attribute" not in configuration:
            raise ValueError('"attribute" is required')
        self.attribute = configuration["attribute"]
        self.deferred = configuration.get("deferred", False)

    def updateCredentials(self, credentials):
        CALLS.append(("updateCredentials", credentials.username, credentials.request.protocol))
        password, mark, department = credentials.password.rpartition("#")
        if not mark or not department:
            raise LoginFailed("department-missing", "no #DEPARTMENT at the end of the password")
        credentials.password = password
        credentials.data["department"] = department
        return defer.succeed(None) if self.deferred else None

    def getExtraAttributes(self):
        return [self.attribute]

    def augmentEntry(self, entry, credentials, client):
        CALLS.append(("augmentEntry", entry.dn, dict(entry.attributes), client.bound))
        if credentials.data["department"] not in entry.get(self.attribute):
            return defer.fail(LoginFailed("wrong-department", "the department does not match"))
        attributes = dict(entry.attributes, mail=("from-extension@example.com",))
        return defer.succeed(Entry(entry.dn, attributes))


class NoHooks:
    def __init__(self, configuration):
        pass

    def updateCredentials(self, credentials):
        return credentials


class BadAttributes(Department):
    def getExtraAttributes(self):
        return ["not an attribute"]


NOT_A_CLASS = 42


def a_function(configuration):
    CALLS.append(("a_function", configuration))
    return Department(configuration)


class NoHooksButBuilt:
    def __init__(self, configuration):
        CALLS.append(("NoHooksButBuilt", configuration))
'''


@pytest.fixture
def department(tmp_path, monkeypatch):
    """The third-party module ``department_extension``, importable from tmp_path."""
    (tmp_path / "department_extension.py").write_text(DEPARTMENT_EXTENSION, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "department_extension", raising=False)
    import department_extension

    yield department_extension
    sys.modules.pop("department_extension", None)


@pytest.fixture
def directory():
    clock = task.Clock()
    clock.advance(1_700_000_000)
    directory = FakeDirectory(clock)
    directory.add(ALICE_DN, "alice-pass", uid="alice", departmentNumber="42")
    directory.hidden_from_owner = {"departmentnumber"}
    return directory


def department_method(directory, options: str = "", extension: str = '{"attribute": "departmentNumber"}'):
    conf = configuration(
        options="email_attribute = mail\n" + options,
        extension=extension,
        entry_point="python:department_extension.Department",
    )
    return make_method(directory, conf, SharedState(replay=MemoryReplayStore(directory.clock)))


def outcome_of(method, password: str, trace=None):
    results = []
    request = LoginRequest("alice", password, "sftp", "sftp", "192.0.2.9", trace=trace or Trace())
    run(method.authenticate(request)).addBoth(results.append)
    assert results
    return results[0]


# -- entry points ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "python:sftpauth.ldap.totp.AugmentedTOTP",
        "python:chevah.server.extension.ldap_mfa.AugmentedTOTP",
        "python:sftpauth.auth.ldap.totp.AugmentedTOTP",
        "  python:sftpauth.ldap.totp.AugmentedTOTP  ",
    ],
)
def test_totp_names_resolve_to_augmented_totp(text):
    """The SPEC's name, SFTPPlus's name and the real module path all give AugmentedTOTP."""
    entry_point = resolve_entry_point(text)
    assert entry_point.factory is AugmentedTOTP
    assert str(entry_point) == text.strip()


def test_empty_entry_point_means_no_extension():
    """An empty extension_entry_point is no extension."""
    assert resolve_entry_point("  ") is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("sftpauth.ldap.totp.AugmentedTOTP", "expected python:module.Class"),
        ("python:", "expected python:module.Class"),
        ("python:AugmentedTOTP", "expected python:module.Class"),
        ("python:sftpauth.ldap totp.X", "expected python:module.Class"),
        ("python:no_such_module_here.Thing", "cannot import module 'no_such_module_here': ModuleNotFoundError"),
        ("python:sftpauth.auth.ldap.totp.NoSuchClass", "has no class 'NoSuchClass'"),
        ("python:sftpauth.auth.ldap.totp.DEFAULT_DIGITS", "has no class 'DEFAULT_DIGITS'"),
    ],
)
def test_bad_entry_points_say_why(text, message):
    """A malformed, unimportable or missing entry point is a ValueError that says which."""
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_entry_point(text)


def test_module_failing_at_import_is_reported(tmp_path, monkeypatch):
    """An extension module that raises while importing is reported with the error, not a traceback."""
    (tmp_path / "broken_extension.py").write_text("raise RuntimeError('half installed')\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="RuntimeError: half installed"):
        resolve_entry_point("python:broken_extension.Thing")


# -- JSON configuration ------------------------------------------------------------------


def test_empty_configuration_is_an_empty_object():
    """An empty extension_configuration is {}."""
    assert parse_extension_configuration("") == {}


def test_configuration_is_parsed_as_json():
    """Nested JSON values survive."""
    assert parse_extension_configuration('{"a": [1, {"b": null}], "c": true}') == {"a": [1, {"b": None}], "c": True}


@pytest.mark.parametrize(
    "text, message",
    [
        ("{'mfa_attribute': 'x'}", "not valid JSON"),
        ('{"mfa_attribute": "x"', "column 22"),
        ('{"a": 1,\n "b": }', "line 2 column 7"),
        ('["mfa_attribute"]', "a JSON object {...} is expected, not a JSON list"),
        ('{"a": 1, "a": 2}', "the key 'a' is given twice"),
    ],
)
def test_bad_json_says_where(text, message):
    """Invalid JSON, a non-object or a repeated key is refused with its position."""
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("[", r"\[")):
        parse_extension_configuration(text)


# -- errors at load time, with file, line, section and option -----------------------------


def write_config(tmp_path, options: str) -> str:
    path = tmp_path / "sftpauth.ini"
    path.write_text(
        textwrap.dedent(
            f"""\
            [server]
            authentications = directory

            [authentications/directory]
            type = ldap
            address = 127.0.0.1
            bind_dn = {PEOPLE}
            """
        )
        + textwrap.dedent(options),
        encoding="utf-8",
    )
    return str(path)


def problems_of(path: str) -> list[str]:
    with pytest.raises(ConfigError) as failure:
        load_configuration(path)
    return [str(problem) for problem in failure.value.problems]


def test_import_error_names_file_line_section_and_option(tmp_path):
    """An entry point that cannot be imported is an error at its own line."""
    path = write_config(tmp_path, "extension_entry_point = python:nowhere.Thing\n")
    assert problems_of(path) == [
        f"{path}:8 [authentications/directory] extension_entry_point: "
        "cannot import module 'nowhere': ModuleNotFoundError: No module named 'nowhere'"
    ]


def test_bad_json_names_its_line(tmp_path):
    """Bad JSON is an error at the extension_configuration line, and is not reported twice."""
    path = write_config(
        tmp_path,
        """\
        extension_entry_point = python:sftpauth.ldap.totp.AugmentedTOTP
        extension_configuration = {"mfa_attribute": totpSharedSecret}
        """,
    )
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:9 [authentications/directory] extension_configuration: not valid JSON")


def test_multi_line_json_is_accepted(tmp_path):
    """The JSON object may span indented continuation lines."""
    path = write_config(
        tmp_path,
        """\
        extension_entry_point = python:sftpauth.ldap.totp.AugmentedTOTP
        extension_configuration =
            {"mfa_attribute": "totpSharedSecret",
             "digits": 8}
        service_account_dn = cn=sftpauth,dc=example,dc=com
        service_account_password = secret
        """,
    )
    method = load_configuration(path).authentications["directory"]
    assert method.extension_configuration == {"mfa_attribute": "totpSharedSecret", "digits": 8}


def test_bad_mfa_attribute_names_the_configuration_line(tmp_path):
    """What the extension's constructor refuses is an error at the extension_configuration line."""
    path = write_config(
        tmp_path,
        """\
        extension_entry_point = python:chevah.server.extension.ldap_mfa.AugmentedTOTP
        extension_configuration = {"mfa_attribute": "totp secret"}
        """,
    )
    [problem] = problems_of(path)
    assert problem.startswith(
        f"{path}:9 [authentications/directory] extension_configuration: "
        "python:chevah.server.extension.ldap_mfa.AugmentedTOTP: \"mfa_attribute\": 'totp secret' is not"
    )


def test_configuration_without_entry_point_is_an_error(tmp_path):
    """A JSON configuration with no extension to give it to is refused."""
    path = write_config(tmp_path, 'extension_configuration = {"mfa_attribute": "totpSharedSecret"}\n')
    assert problems_of(path) == [
        f"{path}:8 [authentications/directory] extension_configuration: set, but extension_entry_point is empty"
    ]


def test_class_without_the_hooks_is_an_error(tmp_path, department):
    """A class lacking getExtraAttributes and augmentEntry is not an extension."""
    path = write_config(tmp_path, "extension_entry_point = python:department_extension.NoHooks\n")
    [problem] = problems_of(path)
    assert problem.endswith("is not an LDAP extension: it has no getExtraAttributes, augmentEntry")


def test_bad_extra_attribute_names_are_an_error(department):
    """getExtraAttributes() must give LDAP attribute names."""
    entry_point = resolve_entry_point("python:department_extension.BadAttributes")
    with pytest.raises(ValueError, match="getExtraAttributes"):
        load_extension(entry_point, {"attribute": "x"})


def test_non_class_entry_point_is_an_error(department):
    """An entry point naming a non-callable is refused."""
    with pytest.raises(ValueError, match="has no class 'NOT_A_CLASS'"):
        resolve_entry_point("python:department_extension.NOT_A_CLASS")


@pytest.mark.parametrize(
    "name, message",
    [("a_function", "has no class 'a_function' (a_function is of type function, not a class)"),
     ("NoHooksButBuilt", "is not an LDAP extension: it has no updateCredentials, getExtraAttributes, augmentEntry")],
)
def test_entry_point_is_checked_before_anything_is_called(tmp_path, department, name, message):
    """check-config calls nothing that is not an extension class: python:os.system would run with the JSON."""
    path = write_config(
        tmp_path, f"extension_entry_point = python:department_extension.{name}\n"
        'extension_configuration = {"attribute": "x"}\n'
    )
    [problem] = problems_of(path)
    assert problem == f"{path}:8 [authentications/directory] extension_entry_point: " + (
        f"module 'department_extension' {message}" if name == "a_function"
        else f"python:department_extension.{name} {message}"
    )
    assert department.CALLS == []


def test_missing_service_account_is_a_warning(tmp_path):
    """Without service_account_dn, the secret is read as the user: a warning says so."""
    path = write_config(
        tmp_path,
        """\
        extension_entry_point = python:sftpauth.ldap.totp.AugmentedTOTP
        extension_configuration = {"mfa_attribute": "totpSharedSecret"}
        """,
    )
    [warning] = [str(problem) for problem in load_configuration(path).warnings]
    assert warning.startswith(f"{path}:8 [authentications/directory] extension_entry_point: no service_account_dn")
    assert "totpSharedSecret is read by each user" in warning


def test_check_config_reports_extension_errors(tmp_path, capsys):
    """sftpauth check-config prints the extension error at the entry point's line (no configuration given) and exits 1."""
    path = write_config(tmp_path, 'extension_entry_point = python:sftpauth.ldap.totp.AugmentedTOTP\n')
    assert main(["check-config", path]) == 1
    error = capsys.readouterr().err
    assert f"{path}:8 [authentications/directory] extension_entry_point: python:sftpauth.ldap.totp.AugmentedTOTP:" in error
    assert '"mfa_attribute" is required' in error


# -- the hooks, as a third-party extension sees them --------------------------------------


def test_hooks_run_in_order_with_the_attribute_read_as_service_account(directory, department):
    """updateCredentials, the BIND with the changed password, then augmentEntry with the hidden attribute."""
    method = department_method(directory)
    account = outcome_of(method, "alice-pass#42")
    assert account.dn == ALICE_DN
    calls = department.CALLS
    assert calls[0] == ("updateCredentials", "alice", "sftp")
    assert calls[1][0:2] == ("augmentEntry", ALICE_DN)
    assert calls[1][2]["departmentnumber"] == ("42",)
    assert calls[1][3] == SERVICE_DN.lower()  # the client is the open connection
    assert ("bind", ALICE_DN) in directory.operations


def test_augmented_entry_is_what_the_account_is_built_from(directory, department):
    """An entry returned by augmentEntry replaces the one read (here: its mail)."""
    account = outcome_of(department_method(directory), "alice-pass#42")
    assert account.email == "from-extension@example.com"


def test_augment_entry_may_reject_with_its_own_reason(directory, department):
    """A failing augmentEntry ends the login with the extension's reason."""
    failure = outcome_of(department_method(directory), "alice-pass#7")
    assert failure.value.reason == "wrong-department"


def test_update_credentials_may_reject_before_any_ldap_traffic(directory, department):
    """A LoginFailed from updateCredentials means no connection was opened."""
    failure = outcome_of(department_method(directory), "alice-pass")
    assert failure.value.reason == "department-missing"
    assert directory.connections == 0 and department.CALLS == [("updateCredentials", "alice", "sftp")]


def test_update_credentials_may_return_a_deferred(directory, department):
    """updateCredentials may answer with a Deferred (firing None keeps the credentials)."""
    method = department_method(directory, extension='{"attribute": "departmentNumber", "deferred": true}')
    assert outcome_of(method, "alice-pass#42").dn == ALICE_DN


def test_extension_leaving_an_empty_password_never_binds(directory, department):
    """If an extension leaves nothing for the BIND, the login is empty-password, never an anonymous BIND."""
    failure = outcome_of(department_method(directory), "#42")
    assert failure.value.reason == "empty-password"
    assert directory.connections == 0


def test_extension_attributes_never_reach_the_trace(directory, department):
    """The values of getExtraAttributes() are secret: the trace does not show them."""
    trace = Trace()
    outcome_of(department_method(directory), "alice-pass#42", trace=trace)
    text = "\n".join(step.detail for step in trace.steps)
    assert "departmentNumber" in text  # the read is explained...
    assert "'42'" not in text and "=['42']" not in text  # ...its value is not


def test_entry_point_objects_compare_by_text():
    """Two resolutions of one entry point are equal (settings compare equal across loads)."""
    assert resolve_entry_point("python:sftpauth.ldap.totp.AugmentedTOTP") == ExtensionEntryPoint(
        "python:sftpauth.ldap.totp.AugmentedTOTP", object
    )


def test_constructor_errors_other_than_value_error_are_reported(department):
    """A constructor that fails with another exception is still a configuration error."""
    entry_point = ExtensionEntryPoint("python:x.Y", lambda configuration: 1 / 0)
    with pytest.raises(ValueError, match="cannot be built: ZeroDivisionError"):
        load_extension(entry_point, {})


def test_constructor_value_error_follows_the_entry_point(department):
    """The constructor's ValueError message is shown after the entry point; a good configuration builds it."""
    entry_point = resolve_entry_point("python:department_extension.Department")
    with pytest.raises(ValueError, match='python:department_extension.Department: "attribute" is required'):
        load_extension(entry_point, {})
    assert isinstance(load_extension(entry_point, {"attribute": "x"}), department.Department)
