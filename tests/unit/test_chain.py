"""The authentication chain, the local ``application`` method and the account it builds (SPEC §3, §4)."""

from __future__ import annotations

import datetime
import json

import attrs
import pytest
import pytest_twisted
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer

from sftpauth.account import Account, checked_home_folder, home_folder_from_group
from sftpauth.audit import AuditLog
from sftpauth.auth.application import ApplicationMethod
from sftpauth.auth.chain import AuthenticationChain, check_input
from sftpauth.auth.credentials import ILoginRequest, LoginRequest
from sftpauth.auth.errors import LoginFailed, UnknownUser
from sftpauth.auth.methods import build_methods
from sftpauth.auth.trace import Trace
from sftpauth.config import models
from sftpauth.config.loader import parse_configuration
from sftpauth.permissions import FULL_CONTROL, Permission
from log_capture import captured_logs

PASSWORD = "s3cret-Pa55word"
AUDIT_FIELDS = {"time", "service", "protocol", "peer", "username", "method", "outcome", "reason"}


@pytest.fixture(scope="module")
def password_hash(make_hash):
    return make_hash(PASSWORD)


@pytest.fixture
def homes(tmp_path):
    folder = tmp_path / "homes"
    folder.mkdir()
    return folder


def configuration_from(text: str, folder) -> models.Configuration:
    return parse_configuration(text, str(folder / "server.ini"), str(folder), {})


class Harness:
    """A configuration, its chain and the audit events it records."""

    def __init__(self, configuration, run_in_thread, methods=None):
        self.configuration = configuration
        self.events: list[dict] = []
        self.audit = AuditLog("", now=_fixed_now)
        self.audit.listeners.append(self.events.append)
        if methods is None:
            methods = {
                method_id: ApplicationMethod(settings, configuration, run_in_thread)
                for method_id, settings in configuration.authentications.items()
                if settings.enabled
            }
        self.methods = methods
        self.chain = AuthenticationChain(configuration, methods, self.audit, run_in_thread, clock=lambda: 100.0)

    def login(self, result_of, username="alice", password=PASSWORD, service_id="ftp", peer="192.0.2.7", **extra):
        request = LoginRequest(username, password, service_id, extra.pop("protocol", "ftp"), peer, **extra)
        return result_of(self.chain.requestAvatarId(request))

    def failure_reason(self, result_of, **kwargs) -> str:
        with pytest.raises(LoginFailed) as caught:
            self.login(result_of, **kwargs)
        assert not isinstance(caught.value, UnknownUser), "the chain must never leak UnknownUser"
        return caught.value.reason


def _fixed_now():
    return datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)


@pytest.fixture
def local(homes, password_hash, run_in_thread, tmp_path):
    """One FTP service and the DEFAULT-AUTHENTICATION method with a few accounts."""
    (homes / "alice").mkdir()
    (homes / "carol").mkdir()
    (homes / "erin").mkdir()
    configuration = configuration_from(
        f"""
[services/ftp]
type = ftp
port = 2121

[groups/readers]
home_folder_path = {homes}
permissions = allow-read, allow-list

[groups/writers]
home_folder_path = {homes}
permissions = allow-full-control

[groups/off]
home_folder_path = {homes}
enabled = no

[accounts/alice]
password = {password_hash}
group = readers, writers

[accounts/bob]
password = {password_hash}
group = readers
enabled = no

[accounts/carol]
password = {password_hash}
group = off

[accounts/erin]
password = {password_hash}
group = readers, off

[accounts/dave]
group = readers
""",
        tmp_path,
    )
    return Harness(configuration, run_in_thread)


# -- the application method through the chain -----------------------------------------


def test_chain_is_a_credentials_checker(local):
    """The chain is the portal's ICredentialsChecker for LoginRequest credentials."""
    assert ICredentialsChecker.providedBy(local.chain)
    assert ILoginRequest in local.chain.credentialInterfaces
    assert ILoginRequest.providedBy(LoginRequest("alice", PASSWORD, "ftp", "ftp", "192.0.2.7"))


def test_successful_login_returns_the_account(local, homes, result_of):
    """A right password gives an Account homed in group home + username, with the primary group's permissions."""
    account = local.login(result_of)
    assert isinstance(account, Account)
    assert account.username == "alice"
    assert account.method_id == models.DEFAULT_AUTHENTICATION
    assert account.home_folder == str(homes / "alice")
    assert account.groups == ("readers", "writers")
    assert account.permissions == {Permission.READ, Permission.LIST}
    assert account.permissions != FULL_CONTROL


def test_the_account_carries_its_home_resolved_in_a_thread(local, homes, tmp_path, result_of, monkeypatch):
    """The jail's root (symbolic links resolved) is found with the home check, off the reactor thread."""
    import os
    import threading

    from sftpauth.realm import SessionRealm

    (homes / "alice").rmdir()
    (tmp_path / "elsewhere").mkdir()
    (homes / "alice").symlink_to(tmp_path / "elsewhere")
    account = local.login(result_of)
    assert account.home_folder == str(homes / "alice")
    assert account.home_root == str((tmp_path / "elsewhere").resolve())
    main = threading.current_thread()

    def realpath(path, *args, **kwargs):
        assert threading.current_thread() is not main, "realpath on the reactor thread"
        return original(path, *args, **kwargs)

    original = os.path.realpath
    monkeypatch.setattr(os.path, "realpath", realpath)
    from twisted.conch.interfaces import IConchUser

    mind = type("Mind", (), {"service_id": "ftp", "protocol": "sftp", "peer": "127.0.0.1"})()
    _, user, logout = SessionRealm(AuditLog(""), None).requestAvatar(account, mind, IConchUser)
    assert user.filesystem.root == account.home_root
    logout()


def test_user_marker_in_home_folder_is_replaced(tmp_path, password_hash, run_in_thread, result_of):
    """A group home_folder_path containing ${USER} has it replaced, not appended."""
    (tmp_path / "data" / "alice" / "files").mkdir(parents=True)
    configuration = configuration_from(
        f"""
[groups/g]
home_folder_path = {tmp_path}/data/${{USER}}/files
[accounts/alice]
password = {password_hash}
group = g
""",
        tmp_path,
    )
    account = Harness(configuration, run_in_thread).login(result_of, service_id="")
    assert account.home_folder == str(tmp_path / "data" / "alice" / "files")


def test_account_home_folder_overrides_the_group(tmp_path, homes, password_hash, run_in_thread, result_of):
    """An account's own home_folder_path wins over its primary group's."""
    own = tmp_path / "special"
    own.mkdir()
    configuration = configuration_from(
        f"""
[groups/g]
home_folder_path = {homes}
[accounts/alice]
password = {password_hash}
group = g
home_folder_path = {own}
""",
        tmp_path,
    )
    assert Harness(configuration, run_in_thread).login(result_of).home_folder == str(own)


def test_user_marker_in_an_accounts_own_home_folder_is_replaced(tmp_path, homes, password_hash, run_in_thread, result_of):
    """${USER} in an account's own home_folder_path is its login name (never a folder named ${USER}); nothing is appended."""
    (tmp_path / "own" / "alice" / "in").mkdir(parents=True)
    configuration = configuration_from(
        f"""
[groups/g]
home_folder_path = {homes}
[accounts/first]
name = alice
password = {password_hash}
group = g
home_folder_path = {tmp_path}/own/${{USER}}/in
""",
        tmp_path,
    )
    account = Harness(configuration, run_in_thread).login(result_of)
    assert account.home_folder == str(tmp_path / "own" / "alice" / "in")


def test_wrong_password_is_invalid_password(local, result_of):
    """A wrong password is refused with reason invalid-password."""
    assert local.failure_reason(result_of, password="not the password") == "invalid-password"


def test_disabled_account_is_refused(local, result_of):
    """A disabled account is refused with account-disabled, even with its right password."""
    assert local.failure_reason(result_of, username="bob") == "account-disabled"


def test_disabled_primary_group_is_refused(local, result_of):
    """An account whose primary group is disabled is refused with group-disabled."""
    assert local.failure_reason(result_of, username="carol") == "group-disabled"


def test_a_disabled_secondary_group_is_refused_too(local, result_of):
    """QA, session 27: disabling a group suspended only those for whom it came first (SFTPPlus: all its accounts)."""
    assert local.failure_reason(result_of, username="erin") == "group-disabled"


def test_account_without_password_is_refused(local, result_of):
    """An account with no password set can never log in."""
    assert local.failure_reason(result_of, username="dave") == "no-password"


def test_unknown_user_is_refused_after_every_method(tmp_path, homes, password_hash, run_in_thread, result_of):
    """A username no method knows is refused as unknown-user once every method said so."""
    configuration = configuration_from(
        f"""
[server]
authentications = first, DEFAULT-AUTHENTICATION
[authentications/first]
type = application
[groups/g]
home_folder_path = {homes}
[accounts/alice]
password = {password_hash}
group = g
""",
        tmp_path,
    )
    harness = Harness(configuration, run_in_thread)
    trace = Trace(clock=lambda: 0.0)
    assert harness.failure_reason(result_of, username="mallory", service_id="", trace=trace) == "unknown-user"
    tried = [step.method for step in trace.steps if step.action == "unknown-user"]
    assert tried == ["first", models.DEFAULT_AUTHENTICATION]
    (event,) = harness.events
    assert (event["outcome"], event["reason"], event["method"]) == ("failure", "unknown-user", "")


def test_local_accounts_cannot_log_into_the_manager(local, result_of):
    """A Web Manager login never matches an [accounts/..] entry."""
    assert local.failure_reason(result_of, manager=True, protocol="manager") == "unknown-user"


def test_disabled_method_is_skipped(tmp_path, homes, password_hash, run_in_thread, result_of):
    """A disabled method in the chain is not built, and the chain goes on past it."""
    (homes / "alice").mkdir()
    configuration = configuration_from(
        f"""
[server]
authentications = off, DEFAULT-AUTHENTICATION
[authentications/off]
type = application
enabled = no
[groups/g]
home_folder_path = {homes}
[accounts/alice]
password = {password_hash}
group = g
""",
        tmp_path,
    )
    methods = build_methods(configuration, run_in_thread, reactor=None)
    assert set(methods) == {models.DEFAULT_AUTHENTICATION}
    account = Harness(configuration, run_in_thread, methods).login(result_of, service_id="")
    assert account.method_id == models.DEFAULT_AUTHENTICATION


@pytest_twisted.ensureDeferred
async def test_login_through_the_reactor(local):
    """The chain also works awaited from a coroutine, as protocol code uses it."""
    request = LoginRequest("alice", PASSWORD, "ftp", "ftp", "192.0.2.7")
    account = await local.chain.requestAvatarId(request)
    assert account.username == "alice"
    with pytest.raises(LoginFailed) as caught:
        await local.chain.requestAvatarId(LoginRequest("alice", "wrong", "ftp", "ftp", "192.0.2.7"))
    assert caught.value.reason == "invalid-password"


# -- chain semantics with stub methods -----------------------------------------------


class StubMethod:
    """A method whose answer the test chooses; records every request it sees."""

    def __init__(self, method_id: str, answer):
        self.id = method_id
        self.answer = answer
        self.calls: list[LoginRequest] = []

    def authenticate(self, request: LoginRequest) -> defer.Deferred:
        self.calls.append(request)
        if isinstance(self.answer, BaseException):
            return defer.fail(self.answer)
        return defer.succeed(self.answer)


def stub_account(method_id: str, home: str) -> Account:
    return Account(username="alice", method_id=method_id, home_folder=home, permissions=FULL_CONTROL, groups=("g",))


def chain_configuration(tmp_path, server_methods="one, two, three", service_methods=""):
    service_line = f"authentications = {service_methods}\n" if service_methods else ""
    return configuration_from(
        f"""
[server]
authentications = {server_methods}
[services/ftp]
type = ftp
port = 21
{service_line}
[authentications/one]
type = application
[authentications/two]
type = application
[authentications/three]
type = application
""",
        tmp_path,
    )


def test_unknown_user_goes_on_to_the_next_method(tmp_path, run_in_thread, result_of):
    """Methods answering unknown-user hand over to the next; the first acceptance ends the chain."""
    one = StubMethod("one", UnknownUser("not here"))
    two = StubMethod("two", stub_account("two", str(tmp_path)))
    three = StubMethod("three", stub_account("three", str(tmp_path)))
    harness = Harness(chain_configuration(tmp_path), run_in_thread, {"one": one, "two": two, "three": three})
    account = harness.login(result_of)
    assert account.method_id == "two"
    assert (len(one.calls), len(two.calls), len(three.calls)) == (1, 1, 0)
    (event,) = harness.events
    assert (event["outcome"], event["method"], event["reason"]) == ("success", "two", "")


def test_rejection_ends_the_chain(tmp_path, run_in_thread, result_of):
    """A method that rejects ends the chain: later methods are never called."""
    one = StubMethod("one", UnknownUser())
    two = StubMethod("two", LoginFailed("invalid-password", "wrong"))
    three = StubMethod("three", stub_account("three", str(tmp_path)))
    harness = Harness(chain_configuration(tmp_path), run_in_thread, {"one": one, "two": two, "three": three})
    assert harness.failure_reason(result_of) == "invalid-password"
    assert (len(one.calls), len(two.calls), len(three.calls)) == (1, 1, 0)
    (event,) = harness.events
    assert (event["outcome"], event["method"], event["reason"]) == ("failure", "two", "invalid-password")


def test_service_authentications_replace_the_server_list(tmp_path, run_in_thread, result_of):
    """A service's own ``authentications`` list is used instead of [server]'s."""
    one = StubMethod("one", stub_account("one", str(tmp_path)))
    two = StubMethod("two", UnknownUser())
    three = StubMethod("three", stub_account("three", str(tmp_path)))
    configuration = chain_configuration(tmp_path, server_methods="one", service_methods="two, three")
    harness = Harness(configuration, run_in_thread, {"one": one, "two": two, "three": three})
    assert harness.login(result_of, service_id="ftp").method_id == "three"
    assert (len(one.calls), len(two.calls), len(three.calls)) == (0, 1, 1)
    # A login that names no configured service uses [server]'s list.
    assert harness.login(result_of, service_id="cli").method_id == "one"
    assert len(one.calls) == 1


class WaitingMethod:
    """A method whose answer never comes until the test gives it (an LDAP server that does not answer)."""

    def __init__(self, method_id: str):
        self.id = method_id
        self.waiting: list[defer.Deferred] = []

    def authenticate(self, request: LoginRequest) -> defer.Deferred:
        self.waiting.append(defer.Deferred())
        return self.waiting[-1]


@pytest.mark.parametrize("late_answer", ["account", "failure"])
def test_logins_still_waiting_at_the_stop_are_audited_once_as_shutdown(tmp_path, run_in_thread, late_answer):
    """QA (lifecycle): a login waiting on its LDAP server when sftpauth stopped got no audit event: the answer
    came after the audit log closed, or never. The stop audits it as failed, reason shutdown, while the log is
    open; a late answer writes nothing more and counts toward no ban."""
    one = StubMethod("one", UnknownUser("not here"))
    two = WaitingMethod("two")
    harness = Harness(chain_configuration(tmp_path, server_methods="one, two"), run_in_thread, {"one": one, "two": two})
    results = []
    harness.chain.requestAvatarId(LoginRequest("alice", PASSWORD, "ftp", "ftp", "192.0.2.7")).addBoth(results.append)
    assert harness.chain.abandon_logins() == 1
    assert results == []
    (event,) = harness.events
    assert (event["event"], event["outcome"], event["reason"], event["method"], event["username"]) == (
        "authentication", "failure", "shutdown", "two", "alice")
    assert harness.chain.abandon_logins() == 0  # audited once
    answer = stub_account("two", str(tmp_path)) if late_answer == "account" else LoginFailed("invalid-password", "x")
    if isinstance(answer, BaseException):
        two.waiting[0].errback(answer)
    else:
        two.waiting[0].callback(answer)
    assert len(harness.events) == 1
    assert isinstance(results[0].value, LoginFailed) and results[0].value.reason == (
        "shutdown" if late_answer == "account" else "invalid-password")


def test_a_finished_login_is_not_abandoned(tmp_path, run_in_thread, result_of):
    """Only logins still waiting are audited at the stop: one answered before has its own event only."""
    one = StubMethod("one", stub_account("one", str(tmp_path)))
    harness = Harness(chain_configuration(tmp_path, server_methods="one"), run_in_thread, {"one": one})
    harness.login(result_of)
    assert harness.chain.abandon_logins() == 0 and [event["outcome"] for event in harness.events] == ["success"]


@pytest.mark.parametrize("password", ["", " ", "    ", "\t", "\t\t", " \t "], ids=repr)
def test_blank_passwords_are_refused_before_any_method(tmp_path, run_in_thread, result_of, password):
    """Empty passwords, or ones of only spaces and tabs, are refused with no method called."""
    one = StubMethod("one", stub_account("one", str(tmp_path)))
    harness = Harness(chain_configuration(tmp_path, server_methods="one"), run_in_thread, {"one": one})
    assert harness.failure_reason(result_of, password=password) == "empty-password"
    assert one.calls == []
    (event,) = harness.events
    assert (event["outcome"], event["reason"]) == ("failure", "empty-password")


def test_a_malformed_answer_is_refused_and_audited_before_any_method(tmp_path, run_in_thread, result_of):
    """A protocol layer's malformed answer (SFTP keyboard-interactive) is a failed login with its detail."""
    one = StubMethod("one", stub_account("one", str(tmp_path)))
    harness = Harness(chain_configuration(tmp_path, server_methods="one"), run_in_thread, {"one": one})
    reason = harness.failure_reason(result_of, password="", malformed="2 keyboard-interactive answers to one prompt")
    assert reason == "invalid-password" and one.calls == []
    (event,) = harness.events
    assert (event["outcome"], event["reason"], event["detail"]) == (
        "failure", "invalid-password", "2 keyboard-interactive answers to one prompt")


@pytest.mark.parametrize(
    "username",
    ["a" * 100_000, "a" * 257, "alice\0", "ali\x00ce", "alice\r\nPASS x", "al\x1bice", "\x7f", "al\udcffice", "", "   "],
    ids=["100KB", "257", "trailing-NUL", "NUL", "CRLF", "ESC", "DEL", "undecodable-byte", "empty", "spaces"],
)
def test_absurd_usernames_are_refused_before_any_method(tmp_path, run_in_thread, result_of, username):
    """Huge, empty or control-character usernames are refused as invalid-username, no method called."""
    one = StubMethod("one", stub_account("one", str(tmp_path)))
    harness = Harness(chain_configuration(tmp_path, server_methods="one"), run_in_thread, {"one": one})
    assert harness.failure_reason(result_of, username=username) == "invalid-username"
    assert one.calls == []
    (event,) = harness.events
    assert len(json.dumps(event)) < 2000, "the audit event must stay bounded"


@pytest.mark.parametrize("password", ["x" * 1025, "pass\0word"], ids=["too-long", "NUL"])
def test_absurd_passwords_are_refused_before_any_method(tmp_path, run_in_thread, result_of, password):
    """Over-long passwords or ones with NUL never reach a method."""
    one = StubMethod("one", stub_account("one", str(tmp_path)))
    harness = Harness(chain_configuration(tmp_path, server_methods="one"), run_in_thread, {"one": one})
    assert harness.failure_reason(result_of, password=password) == "invalid-password"
    assert one.calls == []


def test_unexpected_exception_becomes_internal_error(tmp_path, run_in_thread, result_of):
    """A method raising something unexpected is a refusal with internal-error, not a crash."""
    one = StubMethod("one", ZeroDivisionError(f"boom {PASSWORD}"))
    two = StubMethod("two", stub_account("two", str(tmp_path)))
    harness = Harness(chain_configuration(tmp_path, server_methods="one, two"), run_in_thread, {"one": one, "two": two})
    with pytest.raises(LoginFailed) as caught:
        harness.login(result_of)
    assert isinstance(caught.value, UnauthorizedLogin)
    assert caught.value.reason == "internal-error"
    assert PASSWORD not in str(caught.value)
    assert two.calls == []
    (event,) = harness.events
    assert (event["outcome"], event["method"], event["reason"]) == ("failure", "one", "internal-error")
    assert PASSWORD not in json.dumps(event)


def test_method_raising_synchronously_becomes_internal_error(tmp_path, run_in_thread, result_of):
    """A method that raises instead of returning a failed Deferred is still an internal-error."""

    class Broken:
        id = "one"

        def authenticate(self, request):
            raise KeyError("oops")

    harness = Harness(chain_configuration(tmp_path, server_methods="one"), run_in_thread, {"one": Broken()})
    assert harness.failure_reason(result_of) == "internal-error"


# -- audit events --------------------------------------------------------------------


def test_audit_events_describe_each_attempt_without_the_password(local, result_of):
    """Each attempt is one audit event with who, where, how and why, never the password."""
    local.login(result_of)
    with pytest.raises(LoginFailed):
        local.login(result_of, password=PASSWORD + "-wrong")
    with pytest.raises(LoginFailed):
        local.login(result_of, username="bob")
    with pytest.raises(LoginFailed):
        local.login(result_of, username="nobody")
    assert len(local.events) == 4
    for event in local.events:
        assert AUDIT_FIELDS <= set(event)
        assert event["event"] == "authentication"
        assert event["time"] == "2025-01-02T03:04:05.000+00:00"
        assert (event["service"], event["protocol"], event["peer"]) == ("ftp", "ftp", "192.0.2.7")
    assert [(e["username"], e["outcome"], e["reason"]) for e in local.events] == [
        ("alice", "success", ""),
        ("alice", "failure", "invalid-password"),
        ("bob", "failure", "account-disabled"),
        ("nobody", "failure", "unknown-user"),
    ]
    assert local.events[0]["method"] == models.DEFAULT_AUTHENTICATION
    serialized = json.dumps(local.events)
    assert PASSWORD not in serialized
    assert PASSWORD + "-wrong" not in serialized


def test_a_success_names_the_account_when_it_is_not_what_was_typed(tmp_path, run_in_thread, result_of):
    """ALICE logs in as the account alice: the authentication event keeps ALICE and adds the account that
    session-start and session-end name, so a search for either finds the whole session."""
    harness = Harness(chain_configuration(tmp_path, server_methods="one"), run_in_thread,
                      {"one": StubMethod("one", stub_account("one", str(tmp_path)))})
    harness.login(result_of, username="ALICE")
    harness.login(result_of, username="alice")
    assert [(e["username"], e.get("account")) for e in harness.events] == [("ALICE", "alice"), ("alice", None)]


def test_audit_file_is_json_lines_without_the_password(tmp_path, local, run_in_thread, result_of):
    """The audit file holds one JSON object per attempt, with no password in it."""
    audit_path = tmp_path / "audit.jsonl"
    audit = AuditLog(str(audit_path))
    local.chain = AuthenticationChain(local.configuration, local.methods, audit, run_in_thread)
    try:
        local.login(result_of)
        with pytest.raises(LoginFailed):
            local.login(result_of, password="Wrong-Password-42")
    finally:
        audit.close()
    text = audit_path.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert [json.loads(line)["outcome"] for line in lines] == ["success", "failure"]
    assert PASSWORD not in text
    assert "Wrong-Password-42" not in text


def test_a_cut_username_is_said_to_be_longer_than_what_came():
    """An FTP line cut at its limit: the chain knows only a part, and says "over"."""
    request = LoginRequest("u" * 16_000, "pw", "ftp", "ftp", "192.0.2.1", truncated=True)
    with pytest.raises(LoginFailed) as cut:
        check_input(request)
    assert cut.value.explanation == "the username is over 16000 characters long (at most 256)"
    with pytest.raises(LoginFailed) as whole:
        check_input(attrs.evolve(request, truncated=False))
    assert whole.value.explanation == "the username is 16000 characters long (at most 256)"


def test_undecodable_username_is_audited_to_the_file(tmp_path, local, run_in_thread, result_of):
    """A username with undecodable bytes (a lone surrogate) is refused and audited without crashing."""
    audit_path = tmp_path / "audit.jsonl"
    audit = AuditLog(str(audit_path))
    local.chain = AuthenticationChain(local.configuration, local.methods, audit, run_in_thread)
    try:
        with pytest.raises(LoginFailed) as caught:
            local.login(result_of, username="b\udcffob")
    finally:
        audit.close()
    assert caught.value.reason == "invalid-username"
    (line,) = audit_path.read_text(encoding="utf-8").splitlines()
    assert json.loads(line)["reason"] == "invalid-username"


@pytest.mark.parametrize("with_file", [True, False])
def test_audit_events_go_to_the_server_log_only_without_an_audit_file(tmp_path, with_file):
    """With audit_log set each event is written once, to the file; without it, to the server log."""
    audit = AuditLog(str(tmp_path / "audit.jsonl") if with_file else "")
    try:
        with captured_logs() as events:
            audit.record("session-start", username="alice")
    finally:
        audit.close()
    seen = [event for event in events if event.get("log_namespace") == "sftpauth.audit"]
    echoed = [event["line"] for event in seen if "line" in event]
    if with_file:
        assert echoed == []
        assert json.loads((tmp_path / "audit.jsonl").read_text(encoding="utf-8"))["username"] == "alice"
    else:
        assert [json.loads(line)["username"] for line in echoed] == ["alice"]


# -- home folders --------------------------------------------------------------------


def test_missing_home_folder_is_refused(local, homes, result_of):
    """A home folder that does not exist, with create_home_folder = no, refuses the login."""
    (homes / "alice").rmdir()
    assert local.failure_reason(result_of) == "home-folder-missing"
    assert not (homes / "alice").exists()


def creating_home_folders(tmp_path, home_folder_path, password_hash):
    """alice, of a group with ``create_home_folder = yes`` under ``home_folder_path``."""
    return configuration_from(
        f"""
[groups/g]
home_folder_path = {home_folder_path}
create_home_folder = yes
[accounts/alice]
password = {password_hash}
group = g
""",
        tmp_path,
    )


def test_missing_home_folder_is_created_when_the_group_says_so(tmp_path, homes, password_hash, run_in_thread, result_of):
    """With create_home_folder = yes a missing home folder is created at login."""
    configuration = creating_home_folders(tmp_path, homes / "nested", password_hash)
    account = Harness(configuration, run_in_thread).login(result_of, service_id="")
    assert account.home_folder == str(homes / "nested" / "alice")
    assert (homes / "nested" / "alice").is_dir()


def test_group_without_home_folder_is_refused(tmp_path, password_hash, run_in_thread, result_of):
    """DEFAULT_GROUP has no home_folder_path: its accounts cannot log in until one is set."""
    configuration = configuration_from(f"[accounts/alice]\npassword = {password_hash}\n", tmp_path)
    harness = Harness(configuration, run_in_thread)
    assert harness.failure_reason(result_of, service_id="") == "home-folder-missing"


def test_home_folder_from_group_appends_the_username():
    """``${USER}`` is appended to a group home folder that lacks it."""
    group = models.GroupSettings("g", "", True, "/srv/ftp", False, "yes", FULL_CONTROL)
    assert home_folder_from_group(group, "alice") == "/srv/ftp/alice"
    marked = attrs.evolve(group, home_folder_path="/srv/${USER}/in")
    assert home_folder_from_group(marked, "alice") == "/srv/alice/in"


@pytest.mark.parametrize(
    "path",
    ["/srv/ftp/../etc", "/srv/ftp/..", "../srv/alice", "srv/alice", "", "alice", "/srv/a\0b", "/srv/ftp/alice/../../etc",
     "/srv/e\x1b[31mred", "/srv/eve\nresult: FAKE", "/srv/\x7f", "/srv/b\udcffad"],
)
def test_checked_home_folder_refuses_relative_or_climbing_paths(path):
    """A home folder that is relative, contains '..' or a control character is refused as home-folder-invalid."""
    with pytest.raises(LoginFailed) as caught:
        checked_home_folder(path)
    assert caught.value.reason == "home-folder-invalid"


@pytest.mark.parametrize(
    "path, expected",
    [("/srv/ftp/alice", "/srv/ftp/alice"), ("/srv//ftp/./alice/", "/srv/ftp/alice"), ("/srv/..alice", "/srv/..alice"),
     ("/srv/ftp/Zoë Müller", "/srv/ftp/Zoë Müller")],
)
def test_checked_home_folder_accepts_absolute_paths(path, expected):
    """An absolute home folder without '..' is accepted, normalised."""
    assert checked_home_folder(path) == expected


def test_username_with_dot_dot_cannot_climb_out_of_the_group_home(tmp_path, homes, password_hash, run_in_thread, result_of):
    """A username like '../x' gives a home folder with '..', which is refused."""
    configuration = configuration_from(
        f"""
[groups/g]
home_folder_path = {homes}
create_home_folder = yes
[accounts/evil]
name = ../escaped
password = {password_hash}
group = g
""",
        tmp_path,
    )
    harness = Harness(configuration, run_in_thread)
    assert harness.failure_reason(result_of, username="../escaped", service_id="") == "home-folder-invalid"
    assert not (tmp_path / "escaped").exists()


@pytest.mark.parametrize("name", [".", "..", "a/b", "a/", "/root"])
def test_a_user_name_that_is_not_one_folder_name_gets_no_home_from_user(name, tmp_path, homes, password_hash,
                                                                         run_in_thread, result_of):
    """QA: '.' got the folder of every home (others' files), 'a/b' a folder inside a's home. Both are refused,
    for a group's home and for an account's own ${USER} home; a fixed own home still works."""
    (homes / "a").mkdir()
    configuration = configuration_from(
        f"""
[groups/g]
home_folder_path = {homes}
create_home_folder = yes
[accounts/odd]
name = {name}
password = {password_hash}
group = g
[accounts/own]
name = {name}x
password = {password_hash}
group = g
home_folder_path = {homes}/own/${{USER}}
""",
        tmp_path,
    )
    harness = Harness(configuration, run_in_thread)
    assert harness.failure_reason(result_of, username=name, service_id="") == "home-folder-invalid"
    assert sorted(path.name for path in homes.iterdir()) == ["a"]
    assert list((homes / "a").iterdir()) == []
    with pytest.raises(LoginFailed) as caught:
        home_folder_from_group(configuration.groups["g"], name)
    assert caught.value.reason == "home-folder-invalid" and "cannot stand for ${USER}" in caught.value.explanation
    if "/" in name:  # "a/bx", "a/x": not one folder name either
        assert harness.failure_reason(result_of, username=f"{name}x", service_id="") == "home-folder-invalid"


def test_a_fixed_own_home_folder_needs_no_folder_name(tmp_path, homes, password_hash, run_in_thread, result_of):
    """An account whose own home_folder_path has no ${USER} may have any name, '/' included."""
    (homes / "fixed").mkdir()
    configuration = configuration_from(
        f"""
[groups/g]
home_folder_path = {homes}
[accounts/odd]
name = a/b
password = {password_hash}
group = g
home_folder_path = {homes}/fixed
""",
        tmp_path,
    )
    account = Harness(configuration, run_in_thread).login(result_of, username="a/b", service_id="")
    assert account.home_folder == str(homes / "fixed")


def test_a_local_account_name_matches_composed_or_combining(tmp_path, homes, password_hash, run_in_thread, result_of):
    """QA: 'Ünï' typed with a combining diaeresis was unknown-user; composition does not count, case does."""
    composed, combining = "\u00dcn\u00ef", "U\u0308n\u00ef"
    configuration = configuration_from(
        f"""
[groups/g]
home_folder_path = {homes}
create_home_folder = yes
[accounts/u]
name = {combining}
password = {password_hash}
group = g
""",
        tmp_path,
    )
    harness = Harness(configuration, run_in_thread)
    account = harness.login(result_of, username=composed, service_id="")
    assert account.username == combining  # the account's own name, as configured
    assert harness.failure_reason(result_of, username=composed.lower(), service_id="") == "unknown-user"


def test_a_test_login_creates_no_home_folder(tmp_path, homes, password_hash, run_in_thread, result_of):
    """QA: test-login created the home folder (as whoever ran it); it now says a login would, and creates nothing."""
    configuration = creating_home_folders(tmp_path, homes / "new", password_hash)
    harness = Harness(configuration, run_in_thread)
    trace = Trace()
    account = harness.login(result_of, service_id="", protocol="cli", peer="", trace=trace, test=True)
    assert account.home_folder == str(homes / "new" / "alice") and account.home_root == ""
    assert not (homes / "new").exists()
    assert any("a login creates it" in step.detail for step in trace.steps)
    harness.login(result_of, service_id="")
    assert (homes / "new" / "alice").is_dir()


def test_password_hashes_are_checked_off_the_reactor_thread(local, result_of):
    """verify_password runs through run_in_thread, never directly on the reactor thread."""
    from sftpauth.auth.passwords import verify_password

    offloaded = []

    def spying_run_in_thread(function, *args, **kwargs):
        offloaded.append(function)
        return defer.maybeDeferred(function, *args, **kwargs)

    method = ApplicationMethod(
        local.configuration.authentications[models.DEFAULT_AUTHENTICATION], local.configuration, spying_run_in_thread
    )
    request = LoginRequest("alice", PASSWORD, "ftp", "ftp", "192.0.2.7")
    account = result_of(method.authenticate(request))
    assert account.username == "alice"
    assert offloaded == [verify_password]


def test_a_disabled_or_passwordless_account_costs_a_hash_check_like_a_wrong_password(local, result_of):
    """QA: a disabled name was refused in a few milliseconds where a wrong password takes about a hundred,
    which told a client the name was a disabled account's. Its own hash (or another account's, when it has
    none) is checked in a thread first, the answer ignored: the right password is still refused."""
    from sftpauth.auth.passwords import verify_password

    checked = []

    def spying_run_in_thread(function, *args, **kwargs):
        assert function is verify_password
        checked.append(args[0])
        return defer.maybeDeferred(function, *args, **kwargs)

    harness = Harness(local.configuration, spying_run_in_thread)
    bob, alice = local.configuration.accounts["bob"].password, local.configuration.accounts["alice"].password
    assert harness.failure_reason(result_of, username="bob") == "account-disabled"  # with its right password
    assert harness.failure_reason(result_of, username="bob", password="wrong") == "account-disabled"
    assert harness.failure_reason(result_of, username="dave") == "no-password"
    assert checked == [bob, bob, alice]


def manager_harness(tmp_path, run_in_thread, sections: str) -> Harness:
    """A Web Manager service, ``sections`` (roles, administrators) and the chain with the methods the server builds."""
    configuration = configuration_from("[services/manager]\ntype = manager\nport = 0\n" + sections, tmp_path)
    return Harness(configuration, run_in_thread, build_methods(configuration, run_in_thread, reactor=None))


@pytest.mark.parametrize(
    "roles, refused",
    [("roles = operators", True), ("roles = auditors, operators", True), ("role = auditors", False), ("", True)],
)
def test_an_administrator_with_a_disabled_role_is_refused(roles, refused, tmp_path, password_hash, run_in_thread, result_of):
    """SFTPPlus's ``[roles/..] enabled = no`` refuses every Web Manager login holding the role (DEFAULT-ROLE when none)."""
    harness = manager_harness(
        tmp_path,
        run_in_thread,
        f"""
[roles/DEFAULT-ROLE]
enabled = no
[roles/auditors]
permissions = configuration, read
[roles/operators]
enabled = No
[administrators/alice]
password = {password_hash}
{roles}
""",
    )
    if refused:
        assert harness.failure_reason(result_of, service_id="manager", protocol="manager", manager=True) == "role-disabled"
        assert harness.events[-1]["reason"] == "role-disabled"
    else:
        assert harness.login(result_of, service_id="manager", protocol="manager", manager=True).roles == ("auditors",)


def role_filter_harness(tmp_path, password_hash, run_in_thread, roles: str = "") -> Harness:
    return manager_harness(
        tmp_path,
        run_in_thread,
        f"""
[roles/DEFAULT-ROLE]
source_ip_filter = 192.0.2.0/24, 2001:db8::/32
[roles/auditors]
permissions = configuration, read
[administrators/alice]
password = {password_hash}
{roles}
""",
    )


@pytest.mark.parametrize("peer", ["192.0.2.7", "2001:db8::1", "::ffff:192.0.2.9"])
def test_an_administrator_may_log_in_from_inside_the_roles_source_ip_filter(
    peer, tmp_path, password_hash, run_in_thread, result_of
):
    """SFTPPlus's ``[roles/..] source_ip_filter``: an address in one of its networks (IPv4-mapped too) logs in."""
    harness = role_filter_harness(tmp_path, password_hash, run_in_thread)
    account = harness.login(result_of, service_id="manager", protocol="manager", manager=True, peer=peer)
    assert account.roles == ("DEFAULT-ROLE",)


@pytest.mark.parametrize("peer", ["198.51.100.7", "2001:db9::1"])
def test_an_administrator_from_outside_the_roles_source_ip_filter_is_refused(
    peer, tmp_path, password_hash, run_in_thread, result_of
):
    """The right password from another address is refused, and the audit log says which role's filter."""
    harness = role_filter_harness(tmp_path, password_hash, run_in_thread)
    reason = harness.failure_reason(result_of, service_id="manager", protocol="manager", manager=True, peer=peer)
    assert reason == "role-source-filtered"
    assert harness.events[-1]["detail"] == f"{peer} is not in source_ip_filter of [roles/DEFAULT-ROLE]"


def test_a_role_without_a_source_ip_filter_lets_every_address_in(tmp_path, password_hash, run_in_thread, result_of):
    """Only the roles the login holds count: alice holds auditors, which has no filter."""
    harness = role_filter_harness(tmp_path, password_hash, run_in_thread, roles="roles = auditors")
    account = harness.login(result_of, service_id="manager", protocol="manager", manager=True, peer="198.51.100.7")
    assert account.roles == ("auditors",)


def test_a_test_login_describes_the_roles_source_ip_filter(tmp_path, password_hash, run_in_thread, result_of):
    """sftpauth test-login has no client address: the filter is named in the trace, not applied."""
    harness = role_filter_harness(tmp_path, password_hash, run_in_thread)
    trace = Trace()
    harness.login(result_of, service_id="manager", protocol="cli", manager=True, peer="", trace=trace)
    assert any("source_ip_filter not checked" in step.detail for step in trace.steps)
