"""AuthenticationChain.second_factor: which logins need a code after the password (SSH keyboard-interactive)."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from sftpauth.audit import AuditLog
from sftpauth.auth.chain import AuthenticationChain, SecondFactor
from sftpauth.auth.credentials import LoginRequest
from sftpauth.auth.errors import UnknownUser
from sftpauth.auth.methods import build_methods
from sftpauth.config.loader import parse_configuration
from sftpauth.state import build_state

TOTP = 'extension_entry_point = python:sftpauth.ldap.totp.AugmentedTOTP\nextension_configuration = {"mfa_attribute": "totpSharedSecret"%s}'


def configuration(tmp_path, password_hash, directory_options: str, order: str = "DEFAULT-AUTHENTICATION, DIRECTORY"):
    text = f"""
[server]
authentications = {order}

[services/sftp]
type = ssh
port = 2222

[authentications/DIRECTORY]
type = ldap
address = 127.0.0.1
bind_dn = ou=people,dc=example,dc=com
service_account_dn = cn=sftpauth,dc=example,dc=com
service_account_password = secret
{directory_options}

[authentications/PLAIN]
type = ldap
address = 127.0.0.1
bind_dn = ou=people,dc=example,dc=com

[accounts/alice]
password = {password_hash}

[accounts/bob]
enabled = no
password = {password_hash}
"""
    return parse_configuration(text, str(tmp_path / "sftpauth.ini"), str(tmp_path), {})


def chain_for(config, run_in_thread, methods=None) -> AuthenticationChain:
    if methods is None:
        methods = build_methods(config, run_in_thread, Clock(), build_state("memory", Clock()))
    return AuthenticationChain(config, methods, AuditLog(""), run_in_thread)


def request(username: str, service_id: str = "sftp") -> LoginRequest:
    return LoginRequest(username=username, password="", service_id=service_id, protocol="sftp", peer="192.0.2.1")


@pytest.fixture
def password_hash(make_hash):
    return make_hash("pass-word")


def test_local_accounts_never_need_a_code_and_other_names_reach_the_totp_method(tmp_path, password_hash, run_in_thread):
    """Local accounts (enabled or not) need no code; any other username falls to the TOTP method and needs 6 digits."""
    chain = chain_for(configuration(tmp_path, password_hash, TOTP % ""), run_in_thread)
    assert chain.second_factor(request("alice")) is None
    assert chain.second_factor(request("bob")) is None
    assert chain.second_factor(request("tina")) == SecondFactor(digits=6)
    assert chain.second_factor(request("nobody-at-all")) == SecondFactor(digits=6)


def test_the_digits_come_from_the_extension_configuration(tmp_path, password_hash, run_in_thread):
    """With "digits": 8 the code asked for has 8 digits."""
    chain = chain_for(configuration(tmp_path, password_hash, TOTP % ', "digits": 8'), run_in_thread)
    assert chain.second_factor(request("tina")) == SecondFactor(digits=8)


def test_an_ldap_method_without_totp_needs_no_code(tmp_path, password_hash, run_in_thread):
    """An LDAP method without an extension (native TOTP servers included) gets the whole string at one prompt."""
    config = configuration(tmp_path, password_hash, TOTP % "", order="DEFAULT-AUTHENTICATION, PLAIN, DIRECTORY")
    assert chain_for(config, run_in_thread).second_factor(request("tina")) is None


def test_the_method_hook_decides_when_a_method_has_one(tmp_path, password_hash, run_in_thread):
    """A method's own second_factor() answers for it; UnknownUser passes on to the next method, as logins do."""

    class Hooked:
        def __init__(self, method_id, answer):
            self.id = method_id
            self.answer = answer
            self.asked: list[str] = []

        def authenticate(self, login):  # pragma: no cover - not called here
            return defer.fail(AssertionError("no login here"))

        def second_factor(self, login):
            self.asked.append(login.username)
            if isinstance(self.answer, BaseException):
                raise self.answer
            return self.answer

    config = configuration(tmp_path, password_hash, "", order="DEFAULT-AUTHENTICATION, DIRECTORY")
    first = Hooked("DEFAULT-AUTHENTICATION", UnknownUser("not mine"))
    second = Hooked("DIRECTORY", SecondFactor(digits=7, prompt="Token:"))
    chain = chain_for(config, run_in_thread, {"DEFAULT-AUTHENTICATION": first, "DIRECTORY": second})
    assert chain.second_factor(request("zed")) == SecondFactor(digits=7, prompt="Token:")
    assert first.asked == second.asked == ["zed"]
    broken = Hooked("DIRECTORY", RuntimeError("bug"))
    chain = chain_for(config, run_in_thread, {"DEFAULT-AUTHENTICATION": first, "DIRECTORY": broken})
    assert chain.second_factor(request("zed")) is None  # logged; the user can still type password and code at once


def test_disabled_methods_are_skipped_and_no_method_means_no_code(tmp_path, password_hash, run_in_thread):
    """A disabled (unbuilt) method is skipped; when no method is left nothing is asked."""
    config = configuration(tmp_path, password_hash, TOTP % "")
    chain = chain_for(config, run_in_thread, {})
    assert chain.second_factor(request("tina")) is None


def test_combine_appends_the_code_without_the_spaces_typed_in_it():
    """The checked string is password then code, spaces typed inside the code dropped."""
    assert SecondFactor(digits=6).combine("pass word", " 123 456 ") == "pass word123456"
