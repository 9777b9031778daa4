"""TOTP appended to the password (AugmentedTOTP), driven by a task.Clock and an in-memory directory."""

from __future__ import annotations

import hashlib
import io
import json

import pyotp
import pytest
import segno
from twisted.internet import defer, task

from sftpauth.audit import AuditLog
from sftpauth.auth.chain import AuthenticationChain
from sftpauth.auth.credentials import LoginRequest
from sftpauth.auth.errors import LoginFailed
from sftpauth.auth.ldap.dn import normal_dn
from sftpauth.auth.ldap.totp import (
    AugmentedTOTP,
    InvalidTOTPURI,
    ldif_line,
    new_totp_uri,
    parse_totp_uri,
    terminal_qr_code,
)
from sftpauth.auth.trace import Trace
from sftpauth.cli import main
from sftpauth.state import MemoryBanStore, MemoryReplayStore, SharedState

from ldap_fake import PEOPLE, SERVICE_DN, SERVICE_PASSWORD, FakeDirectory, configuration, make_method, run

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
URI = f"otpauth://totp/Srv:alice?secret={SECRET}&issuer=Srv"
ALICE_DN = f"uid=alice,{PEOPLE}"
BOB_DN = f"uid=bob,{PEOPLE}"
PASSWORD = "alice-pass"
PERIOD = 30
# The start of a 30-second step, plus 10 seconds: far from both edges.
STEP = 56_666_667
NOW = STEP * PERIOD + 10


def code_at(step: int, uri: str = URI) -> str:
    return pyotp.parse_uri(uri).generate_otp(step)


def wrong_code(uri: str = URI) -> str:
    """A code that matches no step from STEP-3 to STEP+3."""
    near = {code_at(STEP + offset, uri) for offset in range(-3, 4)}
    return next(f"{n:06d}" for n in range(1_000_000) if f"{n:06d}" not in near)


@pytest.fixture
def clock():
    clock = task.Clock()
    clock.advance(NOW)
    return clock


@pytest.fixture
def directory(clock):
    """alice has a TOTP URI hidden from herself; bob has none."""
    directory = FakeDirectory(clock)
    directory.add(ALICE_DN, PASSWORD, uid="alice", totpSharedSecret=URI)
    directory.add(BOB_DN, "bob-pass", uid="bob")
    directory.hidden_from_owner = {"totpsharedsecret"}
    return directory


@pytest.fixture
def state(clock):
    return SharedState(replay=MemoryReplayStore(clock))


def request(
    password: str, username: str = "alice", service: str = "ftp", manager: bool = False, trace=None, peer: str = "192.0.2.7"
):
    protocol = "manager" if manager else service
    return LoginRequest(username, password, service, protocol, peer, manager=manager, trace=trace or Trace())


def login(method, password: str, **options):
    """Fire the login at once and return the account, or raise its LoginFailed."""
    outcome = []
    run(method.authenticate(request(password, **options))).addBoth(outcome.append)
    assert outcome, "the login did not finish"
    if isinstance(outcome[0], Exception) or hasattr(outcome[0], "raiseException"):
        outcome[0].raiseException()
    return outcome[0]


def reason_of(method, password: str, **options) -> str:
    with pytest.raises(LoginFailed) as failure:
        login(method, password, **options)
    return failure.value.reason


# -- configuration of the extension ---------------------------------------------------


def test_mfa_attribute_is_required():
    """Without mfa_attribute the extension cannot be built."""
    with pytest.raises(ValueError, match="mfa_attribute"):
        AugmentedTOTP({})


@pytest.mark.parametrize("value", [1, ["totpSharedSecret"], True])
def test_an_mfa_attribute_that_is_not_a_text_is_said_to_be_so(value):
    """{"mfa_attribute": 1} is there, but not a name: the error says so, not that it is missing."""
    with pytest.raises(ValueError) as caught:
        AugmentedTOTP({"mfa_attribute": value})
    assert str(caught.value).startswith(f'"mfa_attribute": {value!r} is not a text')


def test_unknown_configuration_key_is_refused():
    """A misspelt key is an error, not silently ignored."""
    with pytest.raises(ValueError, match="unknown key"):
        AugmentedTOTP({"mfa_attribute": "totpSharedSecret", "digit": 8})


@pytest.mark.parametrize("digits", [5, 9, "6", True, 6.5])
def test_digits_must_be_six_to_eight(digits):
    """Only 6, 7 or 8 digits (JSON numbers) are accepted."""
    with pytest.raises(ValueError, match="digits"):
        AugmentedTOTP({"mfa_attribute": "totpSharedSecret", "digits": digits})


def test_extra_attribute_is_the_mfa_attribute():
    """getExtraAttributes() names the configured attribute."""
    assert AugmentedTOTP({"mfa_attribute": "otpUri"}).getExtraAttributes() == ("otpUri",)


# -- parsing the otpauth URI ----------------------------------------------------------


def test_uri_parameters_are_honoured():
    """Algorithm, digits and period come from the URI."""
    otp = parse_totp_uri(f"otpauth://totp/Srv:bob?secret={SECRET}&algorithm=SHA256&digits=8&period=60")
    assert (otp.digest().name, otp.digits, otp.interval) == ("sha256", 8, 60)


@pytest.mark.parametrize(
    "value, why",
    [
        (SECRET, "not an otpauth"),
        (f"otpauth://hotp/Srv:bob?secret={SECRET}&counter=1", "not an otpauth"),
        ("otpauth://totp/Srv:bob?issuer=Srv", "no secret"),
        ("otpauth://totp/Srv:bob?secret=0189!!!!", "pyotp cannot use"),
        ("otpauth://totp/Srv:bob?secret=JBSWY3DP", "pyotp cannot use"),
        (f"otpauth://totp/Srv:bob?secret={SECRET}&algorithm=MD5", "algorithm"),
        (f"otpauth://totp/Srv:bob?secret={SECRET}&digits=x", "digits"),
        (f"otpauth://totp/Srv:bob?secret={SECRET}&digits=12", "digits 12 is not supported"),
        (f"otpauth://totp/Srv:bob?secret={SECRET}&digits=10", "digits 10 is not supported"),
        (f"otpauth://totp/Srv:bob?secret={SECRET}&digits=5", "digits 5 is not supported"),
        (f"otpauth://totp/Srv:bob?secret={SECRET}&period=0", "pyotp cannot use"),
        (f"otpauth://totp/Srv:bob?secret={SECRET}&encoder=steam", "encoder"),
    ],
)
def test_unusable_uris_are_refused_without_showing_the_secret(value, why):
    """A bad attribute value gives a reason that never contains the secret."""
    with pytest.raises(InvalidTOTPURI, match=why) as failure:
        parse_totp_uri(value)
    assert SECRET not in str(failure.value)
    assert "0189!!!!" not in str(failure.value)


# -- splitting the code off, before any LDAP traffic ----------------------------------


def test_the_last_six_digits_are_the_code_and_the_rest_goes_to_the_bind(directory, state):
    """The BIND gets the password without the code."""
    method = make_method(directory, configuration(), state)
    login(method, PASSWORD + code_at(STEP))
    assert ("bind", ALICE_DN) in directory.operations
    assert directory.passwords[ALICE_DN.lower()] == PASSWORD


@pytest.mark.parametrize("password", ["12345", "123456", "alice-pass12345x", "alice-pass12 456", "alice-pass١٢٣٤٥٦"])
def test_malformed_code_is_refused_before_ldap(directory, state, password):
    """Too short, or not six ASCII digits at the end: totp-wrong-code and no connection at all."""
    method = make_method(directory, configuration(), state)
    assert reason_of(method, password) == "totp-wrong-code"
    assert directory.connections == 0


def test_blank_password_before_the_code_is_refused_before_ldap(directory, state):
    """' ' + code would be an anonymous BIND: refused as empty-password without LDAP traffic."""
    method = make_method(directory, configuration(), state)
    assert reason_of(method, " \t" + code_at(STEP)) == "empty-password"
    assert directory.connections == 0


# -- the code, with one step of drift each way ----------------------------------------


@pytest.mark.parametrize("drift", [-1, 0, 1])
def test_codes_of_previous_current_and_next_step_are_accepted(directory, state, drift):
    """Steps -1, 0 and +1 log in, and the trace names the drift, not the code."""
    method = make_method(directory, configuration(), state)
    trace = Trace()
    code = code_at(STEP + drift)
    account = login(method, PASSWORD + code, trace=trace)
    assert account.dn == ALICE_DN
    details = [step.detail for step in trace.steps]
    expected = {-1: "-1", 0: "0", 1: "+1"}[drift]
    assert f"TOTP code accepted (step drift {expected})" in details
    assert not any(code in detail or SECRET in detail or PASSWORD in detail for detail in details)


@pytest.mark.parametrize("offset", [-3, -2, 2, 3])
def test_codes_further_away_are_refused(directory, state, offset):
    """A code two or more steps away is totp-wrong-code."""
    method = make_method(directory, configuration(), state)
    code = code_at(STEP + offset)
    if code in {code_at(STEP - 1), code_at(STEP), code_at(STEP + 1)}:  # pragma: no cover - one in a million
        pytest.skip("this far code happens to equal a near one")
    assert reason_of(method, PASSWORD + code) == "totp-wrong-code"


def test_the_window_moves_with_the_clock(clock, directory, state):
    """A code accepted as 'next step' now is refused two steps later."""
    method = make_method(directory, configuration(), state)
    future = code_at(STEP + 1)
    clock.advance(3 * PERIOD)
    assert reason_of(method, PASSWORD + future) == "totp-wrong-code"


def test_sha256_eight_digits_and_sixty_seconds_are_honoured(clock, directory, state):
    """With "digits": 8, an 8-digit SHA256 URI with a 60 s period works."""
    uri = f"otpauth://totp/Srv:alice?secret={SECRET}&algorithm=SHA256&digits=8&period=60"
    directory.set(ALICE_DN, "totpSharedSecret", uri)
    method = make_method(directory, configuration(extension='{"mfa_attribute": "totpSharedSecret", "digits": 8}'), state)
    step = int(clock.seconds() // 60)
    code = pyotp.parse_uri(uri).generate_otp(step)
    assert len(code) == 8
    assert login(method, PASSWORD + code).dn == ALICE_DN
    sha1_code = pyotp.TOTP(SECRET, digits=8, interval=60).generate_otp(step)
    if sha1_code != code:
        assert reason_of(method, PASSWORD + sha1_code) == "totp-wrong-code"


def test_uri_with_other_digits_than_configured_is_invalid_secret(directory, state):
    """A configured "digits" is used for every account: an 8-digit URI with "digits": 6 is totp-invalid-secret."""
    uri = f"otpauth://totp/Srv:alice?secret={SECRET}&digits=8"
    directory.set(ALICE_DN, "totpSharedSecret", uri)
    method = make_method(directory, configuration(extension='{"mfa_attribute": "totpSharedSecret", "digits": 6}'), state)
    with pytest.raises(LoginFailed) as failure:
        login(method, PASSWORD + code_at(STEP, uri)[:6])
    assert failure.value.reason == "totp-invalid-secret"
    assert '"digits": 8' in failure.value.explanation


EIGHT = f"otpauth://totp/Srv:alice?secret={SECRET}&algorithm=SHA256&digits=8&period=60"


def eight_digit_code(clock) -> str:
    return pyotp.parse_uri(EIGHT).generate_otp(int(clock.seconds() // 60))


def uri_reads(directory) -> list[int]:
    """Positions in directory.operations of the service account's reads of the secret."""
    return [
        index
        for index, op in enumerate(directory.operations)
        if op[0] == "search" and "totpSharedSecret" in op[2] and op[3] == SERVICE_DN.lower()
    ]


@pytest.mark.parametrize("options", ["", "bind_dn_type = search\n"])
def test_without_configured_digits_the_uri_says_how_many(clock, directory, state, options):
    """SPEC: N from the URI. The secret is read as the service account before alice's BIND, which gets the password."""
    directory.set(ALICE_DN, "totpSharedSecret", EIGHT)
    method = make_method(directory, configuration(options=options), state)
    trace = Trace()
    assert login(method, PASSWORD + eight_digit_code(clock), trace=trace).dn == ALICE_DN
    assert directory.passwords[ALICE_DN.lower()] == PASSWORD
    assert uri_reads(directory)[0] < directory.operations.index(("bind", ALICE_DN))
    details = [step.detail for step in trace.steps]
    assert f"the last 8 characters are the TOTP code; the rest is the password (the otpauth URI of {ALICE_DN} asks for 8 digits)" in details
    assert "otpauth URI (SHA256, 8 digits, 60 s period)" in "\n".join(details)


def test_a_six_digit_code_for_an_eight_digit_uri_is_refused_before_the_bind(clock, directory, state):
    """The URI asks for 8 digits and the password does not end with 8: totp-wrong-code, and alice is never bound."""
    directory.set(ALICE_DN, "totpSharedSecret", EIGHT)
    method = make_method(directory, configuration(), state)
    with pytest.raises(LoginFailed) as failure:
        login(method, PASSWORD + eight_digit_code(clock)[-6:])
    assert failure.value.reason == "totp-wrong-code"
    assert "does not end with an 8-digit TOTP code" in failure.value.explanation
    assert ("bind", ALICE_DN) not in directory.operations


@pytest.mark.parametrize("options", ["", "bind_dn_type = search\n"])
def test_blank_password_left_by_the_uris_digits_is_refused_before_the_bind(clock, directory, state, options):
    """' \t' + an 8-digit code passes the first 6-digit split (' \t12'); the URI's 8 digits leave a blank BIND password: refused."""
    directory.set(ALICE_DN, "totpSharedSecret", EIGHT)
    method = make_method(directory, configuration(options=options), state)
    assert reason_of(method, " \t" + eight_digit_code(clock)) == "empty-password"
    assert not [op for op in directory.operations if op == ("bind", ALICE_DN)]


@pytest.mark.parametrize(
    "values, problem",
    [
        ((f"otpauth://totp/Srv:alice?secret={SECRET}&digits=10",), "digits 10 is not supported (6, 7 or 8)"),
        ((URI, URI.replace("alice", "al")), "has 2 values, not one"),
        ((), "has no totpSharedSecret"),
    ],
)
def test_an_account_without_a_usable_uri_is_refused_before_its_bind(clock, directory, state, values, problem):
    """QA: the URI read before the BIND cannot be used: refused with its reason, and no BIND sends a guessed split."""
    directory.set(ALICE_DN, "totpSharedSecret", *values)
    method = make_method(directory, configuration(), state)
    for typed in (PASSWORD + "1234" + code_at(STEP), PASSWORD + code_at(STEP), "wrong" + code_at(STEP)):
        with pytest.raises(LoginFailed) as failure:
            login(method, typed)
        assert failure.value.reason == ("totp-invalid-secret" if values else "totp-missing-secret")
        assert problem in failure.value.explanation and "read before the BIND, which was not sent" in failure.value.explanation
        assert SECRET not in failure.value.explanation
    assert ("bind", ALICE_DN) not in directory.operations


def test_six_digit_uris_still_work_without_configured_digits(directory, state):
    """The common case: no digits in the URI (6), no "digits" configured, one early read."""
    method = make_method(directory, configuration(), state)
    assert login(method, PASSWORD + code_at(STEP)).dn == ALICE_DN
    assert uri_reads(directory)[0] < directory.operations.index(("bind", ALICE_DN))


def test_configured_digits_skip_the_read_before_the_bind(directory, state):
    """With "digits": 6 the split is known at once: the secret is read only after alice's BIND."""
    method = make_method(directory, configuration(extension='{"mfa_attribute": "totpSharedSecret", "digits": 6}'), state)
    assert login(method, PASSWORD + code_at(STEP)).dn == ALICE_DN
    assert uri_reads(directory) and uri_reads(directory)[0] > directory.operations.index(("bind", ALICE_DN))


def test_without_service_account_the_split_is_six_and_another_uri_says_what_to_do(clock, directory, state):
    """No service account (parent): the URI is read only after the BIND, so 6 digits; an 8-digit URI is refused."""
    directory.hidden_from_owner = set()
    directory.set(ALICE_DN, "totpSharedSecret", EIGHT)
    method = make_method(directory, configuration(service_account=False), state)
    trace = Trace()
    with pytest.raises(LoginFailed) as failure:
        login(method, PASSWORD + eight_digit_code(clock)[:6], trace=trace)
    assert failure.value.reason == "totp-invalid-secret"
    assert "service_account_dn" in failure.value.explanation and '"digits": 8' in failure.value.explanation
    assert "no service account to read the entry before the BIND" in [step.detail for step in trace.steps]


def test_without_service_account_a_refused_bind_says_the_code_length_was_guessed(clock, directory, state):
    """The right password and the whole 8-digit code: the BIND gets two digits too and is refused; the audit says why."""
    directory.hidden_from_owner = set()
    directory.set(ALICE_DN, "totpSharedSecret", EIGHT)
    method = make_method(directory, configuration(service_account=False), state)
    with pytest.raises(LoginFailed) as failure:
        login(method, PASSWORD + eight_digit_code(clock))
    assert failure.value.reason == "invalid-password"
    assert failure.value.explanation.startswith(f"wrong password for {ALICE_DN} (the last 6 characters were taken")
    assert "service_account_dn" in failure.value.explanation and '"digits"' in failure.value.explanation


@pytest.mark.parametrize(
    "options",
    [
        {},  # the service account reads the URI before the BIND: the split is the account's own
        {"extension": '{"mfa_attribute": "totpSharedSecret", "digits": 6}'},  # configured: nothing guessed
    ],
)
def test_a_wrong_password_says_nothing_of_the_code_when_its_length_is_known(directory, state, options):
    method = make_method(directory, configuration(**options), state)
    with pytest.raises(LoginFailed) as failure:
        login(method, "not-alice-pass" + code_at(STEP))
    assert (failure.value.reason, failure.value.explanation) == ("invalid-password", f"wrong password for {ALICE_DN}")


# -- reasons ---------------------------------------------------------------------------


def test_missing_secret_is_refused(directory, state):
    """An entry without the attribute is totp-missing-secret."""
    method = make_method(directory, configuration(), state)
    assert reason_of(method, "bob-pass" + code_at(STEP), username="bob") == "totp-missing-secret"


def test_empty_secret_is_refused_as_missing(directory, state):
    """A blank attribute value counts as missing."""
    directory.set(ALICE_DN, "totpSharedSecret", "  ")
    method = make_method(directory, configuration(), state)
    assert reason_of(method, PASSWORD + code_at(STEP)) == "totp-missing-secret"


def test_invalid_secret_is_refused_without_showing_it(directory, state):
    """An unusable URI is totp-invalid-secret and its explanation holds no secret."""
    directory.set(ALICE_DN, "totpSharedSecret", f"otpauth://totp/Srv:alice?secret={SECRET}&algorithm=MD5")
    method = make_method(directory, configuration(), state)
    with pytest.raises(LoginFailed) as failure:
        login(method, PASSWORD + code_at(STEP))
    assert failure.value.reason == "totp-invalid-secret"
    assert SECRET not in str(failure.value)


def test_several_secrets_are_refused(directory, state):
    """Two values in the attribute are totp-invalid-secret, not 'try each'."""
    directory.set(ALICE_DN, "totpSharedSecret", URI, URI.replace("Srv:alice", "Srv:other"))
    method = make_method(directory, configuration(), state)
    assert reason_of(method, PASSWORD + code_at(STEP)) == "totp-invalid-secret"


def test_wrong_password_with_right_code_is_invalid_password_and_burns_nothing(directory, state):
    """The code is only looked at after the BIND: a wrong password is invalid-password and the code stays usable."""
    method = make_method(directory, configuration(), state)
    code = code_at(STEP)
    assert reason_of(method, "not-alice-pass" + code) == "invalid-password"
    # The URI may be read before the BIND (for its digits), never after a refused one.
    refused_bind = directory.operations.index(("bind", ALICE_DN))
    assert all(read < refused_bind for read in uri_reads(directory))
    assert login(method, PASSWORD + code).dn == ALICE_DN


def test_wrong_password_gives_the_same_answer_whatever_the_code(directory, state):
    """With a wrong password, a right and a wrong code fail identically (same reason, same LDAP operations)."""
    method = make_method(directory, configuration(), state)
    before = len(directory.operations)
    assert reason_of(method, "not-alice-pass" + code_at(STEP)) == "invalid-password"
    with_right_code = [op[:2] for op in directory.operations[before:]]
    before = len(directory.operations)
    assert reason_of(method, "not-alice-pass" + wrong_code()) == "invalid-password"
    assert [op[:2] for op in directory.operations[before:]] == with_right_code


def test_right_password_with_wrong_code_is_wrong_code(directory, state):
    """A right password with a wrong code is totp-wrong-code."""
    method = make_method(directory, configuration(), state)
    assert reason_of(method, PASSWORD + wrong_code()) == "totp-wrong-code"


def test_every_failure_is_an_unauthorized_login_for_the_client(directory, state):
    """Protocols only see twisted.cred's UnauthorizedLogin, whichever factor failed."""
    from twisted.cred.error import UnauthorizedLogin

    method = make_method(directory, configuration(), state)
    for password in ("not-alice-pass" + code_at(STEP), PASSWORD + wrong_code(), PASSWORD + "12"):
        with pytest.raises(UnauthorizedLogin):
            login(method, password)


def test_audit_log_names_the_failed_factor_and_never_the_secrets(tmp_path, clock, directory, state, run_in_thread):
    """Through the chain, audit events carry totp-* reasons and no password, code or secret."""
    conf = configuration(tmp_path=tmp_path)
    method = make_method(directory, conf, state)
    audit_path = tmp_path / "audit.jsonl"
    audit = AuditLog(str(audit_path))
    chain = AuthenticationChain(conf, {"directory": method}, audit, run_in_thread)
    bad = wrong_code()
    good = code_at(STEP)
    attempts = [
        ("alice", PASSWORD + bad),
        ("alice", "not-alice-pass" + good),
        ("bob", "bob-pass" + good),
        ("alice", PASSWORD + good),
        ("alice", PASSWORD + good),
    ]
    for username, password in attempts:
        chain.requestAvatarId(LoginRequest(username, password, "ftp", "ftp", "192.0.2.7")).addErrback(lambda f: None)
    audit.close()
    events = [json.loads(line) for line in audit_path.read_text().splitlines()]
    assert [event["reason"] for event in events] == [
        "totp-wrong-code",
        "invalid-password",
        "totp-missing-secret",
        "",
        "totp-replayed",
    ]
    text = audit_path.read_text()
    for secret in (SECRET, good, bad, PASSWORD, "bob-pass"):
        assert secret not in text


def test_secret_is_read_as_the_service_account(directory, state):
    """With bind_dn_type = parent, the hidden attribute is read after a service-account BIND.

    Once: the read before alice's BIND (for the URI's digits) is used again after it.
    """
    method = make_method(directory, configuration(), state)
    assert login(method, PASSWORD + code_at(STEP)).dn == ALICE_DN  # alice cannot read her secret herself
    reads = [op for op in directory.operations if op[0] == "search" and op[2] == ("totpSharedSecret",)]
    assert [op[1:] for op in reads] == [(ALICE_DN, ("totpSharedSecret",), SERVICE_DN.lower())]
    assert directory.operations.index(reads[0]) < directory.operations.index(("bind", ALICE_DN))
    assert directory.operations.count(("bind", SERVICE_DN)) == 1


def test_without_service_account_a_hidden_secret_is_missing(directory, state):
    """A user who cannot read their own secret (as advised) needs the service account."""
    method = make_method(directory, configuration(service_account=False), state)
    assert reason_of(method, PASSWORD + code_at(STEP)) == "totp-missing-secret"


def test_search_type_reads_the_secret_in_the_service_account_search(directory, state):
    """bind_dn_type = search takes the secret from the service account's search, with no second read."""
    method = make_method(directory, configuration(options="bind_dn_type = search\n"), state)
    assert login(method, PASSWORD + code_at(STEP)).dn == ALICE_DN
    reads = [op for op in directory.operations if op[0] == "search" and "totpSharedSecret" in op[2]]
    assert len(reads) == 1 and reads[0][3] == SERVICE_DN.lower()


def test_entry_trace_hides_the_secret_attribute(directory, state):
    """The trace's entry line lists attributes used but never the secret."""
    method = make_method(directory, configuration(), state)
    trace = Trace()
    login(method, PASSWORD + code_at(STEP), trace=trace)
    text = "\n".join(step.detail for step in trace.steps)
    assert SECRET not in text and "otpauth://" not in text
    assert "otpauth URI (SHA1, 6 digits, 30 s period)" in text


def test_without_extension_the_whole_password_goes_to_ldap(directory, state):
    """With no extension_entry_point, password and digits are one password (servers with native TOTP)."""
    directory.passwords[ALICE_DN.lower()] = "alice-pass123456"
    method = make_method(directory, configuration(extension=""), state)
    assert login(method, "alice-pass123456").dn == ALICE_DN


# -- wrong codes lock the account -------------------------------------------------------


def locking(lock_after: int = 3, lock_seconds: int = 600) -> str:
    return json.dumps({"mfa_attribute": "totpSharedSecret", "lock_after_wrong_codes": lock_after, "lock_seconds": lock_seconds})


@pytest.fixture
def shared(clock):
    """The state build_state makes for state = memory: replay store and ban store."""
    return SharedState(replay=MemoryReplayStore(clock), bans=MemoryBanStore(clock))


def test_wrong_codes_in_a_row_lock_the_account_from_every_address(clock, directory, shared):
    """The lock counts per account: a botnet that knows the password cannot spread its guesses over addresses."""
    method = make_method(directory, configuration(extension=locking()), shared)
    for peer in ("192.0.2.1", "198.51.100.2", "203.0.113.3"):
        with pytest.raises(LoginFailed) as failure:
            login(method, PASSWORD + wrong_code(), peer=peer)
        assert failure.value.reason == "totp-wrong-code"
    assert "3 in a row" in failure.value.explanation and "refused for 600 seconds" in failure.value.explanation
    # The right code is refused too, and not looked at: it stays usable once the lock ends.
    assert reason_of(method, PASSWORD + code_at(STEP)) == "totp-locked"
    assert reason_of(method, PASSWORD + code_at(STEP), service="sftp", manager=True) == "totp-locked"
    clock.advance(601)
    now = int(clock.seconds() // PERIOD)
    assert login(method, PASSWORD + code_at(now)).dn == ALICE_DN


def test_each_wrong_code_says_how_many_are_left(directory, shared):
    """The audit detail of a wrong code counts toward the lock."""
    method = make_method(directory, configuration(extension=locking()), shared)
    with pytest.raises(LoginFailed) as failure:
        login(method, PASSWORD + wrong_code())
    assert "(1 of 3 in a row before the account is locked)" in failure.value.explanation


def test_a_right_code_clears_the_wrong_ones(directory, shared):
    """Only wrong codes in a row count: a login in between starts again from zero."""
    method = make_method(directory, configuration(extension=locking()), shared)
    for _ in range(2):
        assert reason_of(method, PASSWORD + wrong_code()) == "totp-wrong-code"
    login(method, PASSWORD + code_at(STEP))
    for _ in range(2):
        assert reason_of(method, PASSWORD + wrong_code()) == "totp-wrong-code"
    assert login(method, PASSWORD + code_at(STEP + 1)).dn == ALICE_DN


def test_wrong_passwords_never_lock_the_account(directory, shared):
    """Without the password nobody reaches the code, so nobody can lock its owner out."""
    method = make_method(directory, configuration(extension=locking()), shared)
    for _ in range(5):
        assert reason_of(method, "not-alice-pass" + wrong_code()) == "invalid-password"
    assert login(method, PASSWORD + code_at(STEP)).dn == ALICE_DN


def test_the_lock_is_per_account(directory, shared):
    """Another account with a TOTP secret is not locked by alice's wrong codes."""
    directory.add(BOB_DN.replace("bob", "carol"), "carol-pass", uid="carol", totpSharedSecret=URI.replace("alice", "carol"))
    method = make_method(directory, configuration(extension=locking()), shared)
    for _ in range(3):
        reason_of(method, PASSWORD + wrong_code())
    assert reason_of(method, PASSWORD + code_at(STEP)) == "totp-locked"
    assert login(method, "carol-pass" + code_at(STEP), username="carol").dn == BOB_DN.replace("bob", "carol")


def test_lock_after_zero_never_locks(directory, shared):
    """"lock_after_wrong_codes": 0 turns the lock off."""
    method = make_method(directory, configuration(extension=locking(lock_after=0)), shared)
    for _ in range(12):
        assert reason_of(method, PASSWORD + wrong_code()) == "totp-wrong-code"
    assert login(method, PASSWORD + code_at(STEP)).dn == ALICE_DN


def test_ten_wrong_codes_lock_by_default(directory, shared):
    """Without the keys: 10 wrong codes in a row lock the account for 900 seconds."""
    method = make_method(directory, configuration(), shared)
    for _ in range(9):
        assert reason_of(method, PASSWORD + wrong_code()) == "totp-wrong-code"
    with pytest.raises(LoginFailed) as failure:
        login(method, PASSWORD + wrong_code())
    assert "refused for 900 seconds" in failure.value.explanation
    assert reason_of(method, PASSWORD + code_at(STEP)) == "totp-locked"


@pytest.mark.parametrize(
    "key, value", [("lock_after_wrong_codes", -1), ("lock_after_wrong_codes", "5"), ("lock_after_wrong_codes", True),
                   ("lock_seconds", 0), ("lock_seconds", "60"), ("lock_seconds", 86401)]
)
def test_lock_keys_are_checked(key, value):
    """A lock that cannot work is refused when the configuration is read."""
    with pytest.raises(ValueError, match=f'^"{key}": {value!r} is not a'):
        AugmentedTOTP({"mfa_attribute": "totpSharedSecret", key: value})


# -- replay ----------------------------------------------------------------------------


def test_replay_is_refused_across_services(directory, state):
    """A code used over FTP is refused over SFTP and the Web Manager, until the next code."""
    method = make_method(directory, configuration(), state)
    code = code_at(STEP)
    login(method, PASSWORD + code, service="ftp")
    assert reason_of(method, PASSWORD + code, service="sftp") == "totp-replayed"
    assert reason_of(method, PASSWORD + code, manager=True) == "totp-replayed"
    assert login(method, PASSWORD + code_at(STEP + 1), service="sftp").dn == ALICE_DN


def test_replay_is_refused_by_another_method_object_sharing_the_state(directory, state):
    """Two LDAPMethod objects built on one SharedState (as build_runtime does) see each other's codes."""
    first = make_method(directory, configuration(), state)
    second = make_method(directory, configuration(), state)
    code = code_at(STEP)
    login(first, PASSWORD + code)
    assert reason_of(second, PASSWORD + code) == "totp-replayed"


def test_replay_is_refused_by_another_method_on_the_same_directory(directory, state):
    """Two [authentications/..] sections on one directory (say FTP uses one, SFTP the other): one code, one login."""
    other = """
        [authentications/other]
        type = ldap
        address = 127.0.0.1
        bind_dn = {people}
        username_attribute = uid
        extension_entry_point = python:sftpauth.ldap.totp.AugmentedTOTP
        extension_configuration = {{"mfa_attribute": "totpSharedSecret"}}
        service_account_dn = {service}
        service_account_password = {password}
        """.format(people=PEOPLE, service=SERVICE_DN, password=SERVICE_PASSWORD)
    both = configuration(other)
    first = make_method(directory, both, state)
    second = make_method(directory, both, state, method_id="other")
    code = code_at(STEP)
    login(first, PASSWORD + code)
    assert reason_of(second, PASSWORD + code) == "totp-replayed"
    assert login(second, PASSWORD + code_at(STEP + 1)).dn == ALICE_DN


def test_replayed_code_stays_refused_while_it_is_valid(clock, directory, state):
    """A code used as 'previous step' is refused for as long as the window can accept it."""
    method = make_method(directory, configuration(), state)
    code = code_at(STEP + 1)
    login(method, PASSWORD + code)
    clock.advance(PERIOD)  # now STEP + 1: the code is the current one
    assert reason_of(method, PASSWORD + code) == "totp-replayed"
    clock.advance(PERIOD)  # now STEP + 2: the code is the previous one
    assert reason_of(method, PASSWORD + code) == "totp-replayed"
    clock.advance(PERIOD)  # now STEP + 3: out of the window, wrong whatever the store says
    assert reason_of(method, PASSWORD + code) == "totp-wrong-code"


def test_replay_store_entries_expire(clock, directory, state):
    """Used codes leave the store once they cannot be valid any more."""
    method = make_method(directory, configuration(), state)
    login(method, PASSWORD + code_at(STEP))
    assert len(state.replay) == 1
    clock.advance(4 * PERIOD)
    assert len(state.replay) == 0


def test_codes_of_different_accounts_do_not_collide(directory, state):
    """A code used by one account does not block another account whose code is equal."""
    bob_uri = URI.replace("alice", "bob")  # same secret, so the same codes
    directory.set(BOB_DN, "totpSharedSecret", bob_uri)
    method = make_method(directory, configuration(), state)
    code = code_at(STEP)
    login(method, PASSWORD + code)
    assert login(method, "bob-pass" + code, username="bob").dn == BOB_DN


def test_two_concurrent_logins_with_one_code_only_one_wins(clock, directory, state):
    """Two logins racing with the same code both pass the BIND, but only one is let in."""
    directory.latency = 0.05
    method = make_method(directory, configuration(), state)
    code = code_at(STEP)
    outcomes = []
    for service in ("ftp", "sftp"):
        run(method.authenticate(request(PASSWORD + code, service=service))).addBoth(outcomes.append)
    assert outcomes == []  # both are waiting on LDAP
    for _ in range(20):
        clock.advance(0.05)
    assert len(outcomes) == 2
    accepted = [outcome for outcome in outcomes if not hasattr(outcome, "value")]
    refused = [outcome.value for outcome in outcomes if hasattr(outcome, "value")]
    assert len(accepted) == 1 and accepted[0].dn == ALICE_DN
    assert [failure.reason for failure in refused] == ["totp-replayed"]
    binds = [op for op in directory.operations if op == ("bind", ALICE_DN)]
    assert len(binds) == 2  # the loser's password was right too
    assert directory.open_connections == 0


def test_full_replay_store_refuses_as_service_unavailable(directory, clock):
    """When the store is full of live codes a new login is refused, never let in unchecked."""
    state = SharedState(replay=MemoryReplayStore(clock, max_entries=1))
    directory.set(BOB_DN, "totpSharedSecret", URI.replace("alice", "bob"))
    method = make_method(directory, configuration(), state)
    login(method, PASSWORD + code_at(STEP))
    assert reason_of(method, "bob-pass" + code_at(STEP), username="bob") == "service-unavailable"


def test_a_failing_replay_store_refuses(directory, clock):
    """A store that cannot answer (a Redis outage) means no login, never a login without the check."""

    class BrokenStore:
        def claim(self, key, ttl):
            return defer.fail(ConnectionError("store down"))

    method = make_method(directory, configuration(), SharedState(replay=BrokenStore()))
    assert reason_of(method, PASSWORD + code_at(STEP)) == "service-unavailable"


# -- sftpauth totp new -----------------------------------------------------------------


def test_new_uri_is_a_fresh_160_bit_secret_that_sftpauth_reads():
    """new_totp_uri() makes a valid otpauth URI with the issuer and a new 160-bit secret each time."""
    first, second = new_totp_uri("bob", "Example Srv"), new_totp_uri("bob", "Example Srv")
    assert first != second
    otp = parse_totp_uri(first)
    assert len(otp.byte_secret()) == 20
    assert (otp.name, otp.issuer, otp.digits, otp.interval) == ("bob", "Example Srv", 6, 30)


def test_totp_new_prints_uri_qr_code_and_ldif_line(capsys):
    """The command prints the URI, a terminal QR code of exactly that URI, and the LDIF line."""
    assert main(["totp", "new", "bob", "--issuer", "Srv"]) == 0
    output = capsys.readouterr().out
    uri = next(line for line in output.splitlines() if line.startswith("otpauth://totp/"))
    assert uri.startswith("otpauth://totp/Srv:bob?secret=") and "issuer=Srv" in uri
    assert terminal_qr_code(uri) in output
    assert f"totpSharedSecret: {uri}" in output.splitlines()
    expected = io.StringIO()
    segno.make(uri, error="m", micro=False).terminal(out=expected, compact=True, border=2)
    assert expected.getvalue() == terminal_qr_code(uri)


def test_totp_new_attribute_and_digits_options(capsys):
    """--attribute names the LDIF attribute and --digits 8 makes 8-digit URIs and says to configure it."""
    assert main(["totp", "new", "bob", "--attribute", "otpUri", "--digits", "8"]) == 0
    output = capsys.readouterr().out
    line = next(line for line in output.splitlines() if line.startswith("otpUri: "))
    assert parse_totp_uri(line[len("otpUri: "):]).digits == 8
    assert '"digits": 8' in output


@pytest.mark.parametrize("name", ["bad attr:x", "", "totp;binary"])
def test_totp_new_refuses_an_attribute_that_is_not_an_ldap_name(capsys, name):
    """An LDIF line for 'bad attr:x' could not be loaded: exit 2 with the reason, no secret printed."""
    with pytest.raises(SystemExit) as exited:
        main(["totp", "new", "bob", "--attribute", name])
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert "otpauth://" not in captured.out
    assert "argument --attribute: " in captured.err


def test_ldif_line_falls_back_to_base64():
    """A value LDIF cannot hold as is becomes 'attr:: base64'."""
    assert ldif_line("a", "otpauth://totp/x") == "a: otpauth://totp/x"
    assert ldif_line("a", ":x") == "a:: Ong="


def test_the_replay_key_does_not_give_the_code_away(directory, clock):
    """Whoever reads the store's keys (Redis) cannot recover the code: the key is the account and the step only.

    A SHA-256 of DN, step and a 6-digit code was reversed from a Redis key in seconds.
    """
    claimed = []

    class RecordingStore:
        def claim(self, key, ttl):
            claimed.append(key)
            return defer.succeed(True)

    method = make_method(directory, configuration(), SharedState(replay=RecordingStore()))
    code = code_at(STEP)
    login(method, PASSWORD + code)
    assert claimed, "the code was never claimed"
    material = [f"{normal_dn(ALICE_DN)}\0{step}".encode() for step in (STEP - 1, STEP, STEP + 1)]
    hashes = {"totp-replay:" + hashlib.sha256(text).hexdigest() for text in material}
    assert set(claimed) <= hashes
    assert not any(code in key for key in claimed)
