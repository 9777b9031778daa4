"""The keyboard-interactive conversation of sftpauth.ssh.UserAuthServer, in memory with a fake checker."""

from __future__ import annotations

import struct
from types import SimpleNamespace
from typing import Optional

import pytest
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import transport as ssh_transport
from twisted.conch.ssh import userauth
from twisted.conch.ssh.common import NS, getNS
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from zope.interface import implementer

from sftpauth.auth.chain import SecondFactor
from sftpauth.auth.credentials import ILoginRequest
from sftpauth.ssh import LoginState, UserAuthServer

INFO_REQUEST, INFO_RESPONSE = 60, 61
SUCCESS, FAILURE = userauth.MSG_USERAUTH_SUCCESS, userauth.MSG_USERAUTH_FAILURE


@implementer(ICredentialsChecker)
class FakeChain:
    """Accepts ``password`` (password+code for users in ``totp``); records what it was asked."""

    credentialInterfaces = (ILoginRequest,)

    def __init__(self, passwords: dict[str, str], totp: dict[str, SecondFactor]):
        self.passwords = passwords
        self.totp = totp
        self.checked: list[tuple[str, str]] = []
        self.asked: list[str] = []
        self.malformed: list[str] = []

    def requestAvatarId(self, credentials):
        self.checked.append((credentials.username, credentials.password))
        if credentials.malformed:
            self.malformed.append(credentials.malformed)
            return defer.fail(UnauthorizedLogin("invalid-password"))
        if self.passwords.get(credentials.username) == credentials.password:
            return defer.succeed(credentials.username)
        return defer.fail(UnauthorizedLogin("login failed"))

    def second_factor(self, request) -> Optional[SecondFactor]:
        self.asked.append(request.username)
        return self.totp.get(request.username)


@implementer(IRealm)
class FakeRealm:
    def requestAvatar(self, avatar_id, mind, *interfaces):
        avatar = SimpleNamespace(logout=lambda: None, sftpEnabled=True)
        return IConchUser, avatar, lambda: None


class FakeTransport:
    """What UserAuthServer uses of conch's SSHServerTransport."""

    def __init__(self, portal: Portal, clock: Clock, message: str = "Password:"):
        settings = SimpleNamespace(id="sftp", keyboard_interactive_message=message, sftp=True)
        self.factory = SimpleNamespace(
            settings=settings, reactor=clock, portal=portal, getService=lambda transport, name: lambda: None
        )
        self.transport = SimpleNamespace(getPeer=lambda: IPv4Address("TCP", "192.0.2.9", 50000))
        self.loginState = LoginState()
        self.packets: list[tuple[int, bytes]] = []
        self.disconnected: Optional[tuple[int, bytes]] = None
        self.service = None

    def isEncrypted(self, direction: str) -> bool:
        return True

    def sendPacket(self, kind: int, payload: bytes) -> None:
        self.packets.append((kind, payload))

    def sendDisconnect(self, code: int, reason: bytes) -> None:
        self.disconnected = (code, reason)

    def setService(self, service) -> None:
        self.service = service


class Harness:
    def __init__(self, message: str = "Password:"):
        self.clock = Clock()
        self.chain = FakeChain(
            {"alice": "alice-pass", "tina": "tina-pass123456"}, {"tina": SecondFactor(digits=6)}
        )
        self.transport = FakeTransport(Portal(FakeRealm(), [self.chain]), self.clock, message)
        self.server = UserAuthServer()
        self.server.transport = self.transport
        self.transport.service = self.server
        self.server.serviceStarted()

    def request(self, user: bytes, method: bytes, data: bytes = b"") -> None:
        self.server.ssh_USERAUTH_REQUEST(NS(user) + NS(b"ssh-connection") + NS(method) + data)

    def keyboard_interactive(self, user: bytes) -> None:
        self.request(user, b"keyboard-interactive", NS(b"") + NS(b""))

    def answer(self, *responses: bytes) -> None:
        self.server.ssh_USERAUTH_INFO_RESPONSE(struct.pack(">L", len(responses)) + b"".join(NS(r) for r in responses))

    def take(self) -> list[tuple[int, bytes]]:
        packets, self.transport.packets = self.transport.packets, []
        return packets


def prompts_of(payload: bytes) -> list[tuple[str, bool]]:
    name, instruction, language, rest = getNS(payload, 3)
    (count,) = struct.unpack(">L", rest[:4])
    rest = rest[4:]
    prompts = []
    for _ in range(count):
        text, rest = getNS(rest)
        prompts.append((text.decode("utf-8"), rest[0] != 0))
        rest = rest[1:]
    return prompts


def test_offered_methods_follow_the_portals_checkers():
    """A portal whose checker takes ILoginRequest offers password and keyboard-interactive."""
    assert Harness().server.supportedAuthentications == [b"password", b"keyboard-interactive"]


def test_two_prompts_and_one_check_of_password_plus_code():
    """A TOTP user is asked the password, then the code; only then is password+code checked, once."""
    harness = Harness()
    harness.keyboard_interactive(b"tina")
    [(kind, payload)] = harness.take()
    assert kind == INFO_REQUEST and prompts_of(payload) == [("Password:", False)]
    harness.answer(b"tina-pass")
    [(kind, payload)] = harness.take()
    assert kind == INFO_REQUEST and prompts_of(payload) == [("Verification code:", False)]
    assert harness.chain.checked == []  # nothing said about the password before the code
    harness.answer(b"123 456")
    assert harness.chain.checked == [("tina", "tina-pass123456")]
    assert [kind for kind, payload in harness.take()] == [SUCCESS]


def test_a_user_without_second_factor_gets_one_prompt_with_the_configured_message():
    """Without a second factor one prompt (keyboard_interactive_message) and the password alone is checked."""
    harness = Harness(message="Directory password:")
    harness.keyboard_interactive(b"alice")
    [(kind, payload)] = harness.take()
    assert prompts_of(payload) == [("Directory password:", False)]
    harness.answer(b"alice-pass")
    assert harness.chain.checked == [("alice", "alice-pass")]
    assert [kind for kind, payload in harness.take()] == [SUCCESS]


def test_a_wrong_answer_fails_after_the_delay_and_counts():
    """A refused keyboard-interactive login is answered with FAILURE after a second and counts as a failed login."""
    harness = Harness()
    harness.keyboard_interactive(b"tina")
    harness.answer(b"wrong")
    harness.answer(b"000000")
    harness.take()
    harness.clock.advance(0.5)
    assert harness.take() == []
    harness.clock.advance(1)
    [(kind, payload)] = harness.take()
    assert kind == FAILURE and getNS(payload)[0] == b"password,keyboard-interactive"
    assert harness.transport.loginState.failures == 1


def test_a_failed_password_is_answered_one_second_after_the_request_however_long_the_check_took():
    """As on FTP: the delay counts from the request, so a slow refusal (a hash, a ban held back) comes no later than a fast one."""
    harness = Harness()
    pending = defer.Deferred()
    harness.chain.requestAvatarId = lambda credentials: pending
    harness.request(b"alice", b"password", b"\x00" + NS(b"wrong"))
    harness.clock.advance(0.4)
    pending.errback(UnauthorizedLogin("invalid-password"))
    harness.clock.advance(0.59)
    assert harness.take() == []
    harness.clock.advance(0.01)
    assert [kind for kind, payload in harness.take()] == [FAILURE]
    late = defer.Deferred()
    harness.chain.requestAvatarId = lambda credentials: late
    harness.request(b"alice", b"password", b"\x00" + NS(b"wrong"))
    harness.clock.advance(1.5)  # the chain held a banned refusal back a second, and more
    late.errback(UnauthorizedLogin("banned"))
    assert [kind for kind, payload in harness.take()] == [FAILURE]  # at once, not a second more


def test_the_prompt_is_the_message_exactly_as_configured():
    """SPEC: the prompt is keyboard_interactive_message; nothing is added (a space only when configured)."""
    for message in ("Password:", "Code please "):
        harness = Harness(message=message)
        harness.keyboard_interactive(b"alice")
        [(kind, payload)] = harness.take()
        assert prompts_of(payload) == [(message, False)]


def test_a_new_request_abandons_the_pending_prompt():
    """A USERAUTH_REQUEST while a prompt waits ends that attempt silently (RFC 4256) and is itself handled."""
    harness = Harness()
    harness.keyboard_interactive(b"tina")
    harness.take()
    harness.request(b"alice", b"password", b"\x00" + NS(b"alice-pass"))
    assert harness.chain.checked == [("alice", "alice-pass")]
    assert [kind for kind, payload in harness.take()] == [SUCCESS]
    assert harness.transport.loginState.failures == 0


def test_a_response_without_a_prompt_disconnects():
    """An INFO_RESPONSE nobody asked for is a protocol error."""
    harness = Harness()
    harness.answer(b"surprise")
    assert harness.transport.disconnected[0] == ssh_transport.DISCONNECT_PROTOCOL_ERROR


@pytest.mark.parametrize("responses", [(), (b"alice-pass", b"b")])
def test_the_wrong_number_of_responses_is_a_failed_login_the_chain_audits(responses):
    """Zero or two answers to one prompt fail the attempt, through the chain (audit, bans) without a password."""
    harness = Harness()
    harness.keyboard_interactive(b"alice")
    harness.take()
    harness.answer(*responses)
    harness.clock.advance(2)
    assert [kind for kind, payload in harness.take()] == [FAILURE]
    assert harness.chain.checked == [("alice", "")]
    assert harness.chain.malformed == [f"{len(responses)} keyboard-interactive answers to one prompt"]
    assert harness.transport.loginState.failures == 1


def test_password_and_code_typed_at_the_first_prompt_work_with_an_empty_second_answer():
    """A user who typed password and code together at the first prompt just presses Enter at the second."""
    harness = Harness()
    harness.keyboard_interactive(b"tina")
    harness.answer(b"tina-pass123456")
    harness.answer(b"")
    assert harness.chain.checked == [("tina", "tina-pass123456")]
    assert [kind for kind, payload in harness.take()][-1] == SUCCESS
