"""Security policies (bans, denied usernames, source filters), their ban store, and the connection guard."""

from __future__ import annotations

import socket
import struct
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import address, defer, task
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from sftpauth.account import Account
from sftpauth.audit import AuditLog
from sftpauth.auth.chain import AuthenticationChain
from sftpauth.auth.credentials import LoginRequest
from sftpauth.auth.errors import LoginFailed, UnknownUser
from sftpauth.auth.policy import (
    FLOOD_REFUSAL_DELAY,
    NOT_COUNTED,
    SecurityPolicies,
    SecurityPolicy,
    client_key,
    normalise_address,
    plain_address,
)
from sftpauth.config.errors import ConfigError
from sftpauth.config.loader import parse_configuration
from sftpauth.listening import (
    PROXY_HEADER_TIMEOUT,
    SHUTDOWN_GRACE,
    ConnectionGuardFactory,
    InvalidHeader,
    ProxyHeaderReader,
    raise_open_file_limit,
)
from sftpauth.permissions import FULL_CONTROL
from sftpauth.state import (
    InvalidStateURL,
    MemoryBanStore,
    RedisConnection,
    RedisLocation,
    build_state,
    parse_state_url,
    redis_key,
)

BASE = """
[server]
authentications = DEFAULT-AUTHENTICATION

[services/ftp]
type = ftp
port = 2121

[services/sftp]
type = ssh
port = 2222
"""


def configuration(extra: str = "", tmp_path=None):
    return parse_configuration(textwrap.dedent(BASE + extra), "/tmp/policy.ini", "/tmp", {})


POLICIES = """
[services/other]
type = ftp
port = 2323
security_policy = lenient

[security-policies/DEFAULT-SECURITY-POLICY]
source_ip_ban_after_count = 3
source_ip_ban_interval = 60
deny_usernames = root, admin*
deny_administrators = m/^ops-/
source_ip_filter =

[security-policies/lenient]
source_ip_ban_after_count = 0
source_ip_filter = 192.0.2.0/24, 2001:db8::/32
"""


class Recorder:
    """The audit events of one test."""

    def __init__(self):
        self.events: list[dict] = []
        self.audit = AuditLog("")
        self.audit.listeners.append(self.events.append)

    def of(self, kind: str) -> list[dict]:
        return [event for event in self.events if event["event"] == kind]


@pytest.fixture
def clock():
    return task.Clock()


@pytest.fixture
def recorder():
    return Recorder()


@pytest.fixture
def policies(clock, recorder):
    conf = configuration(POLICIES)
    return SecurityPolicies(conf, MemoryBanStore(clock), recorder.audit, clock)


def request(username="alice", peer="198.51.100.7", service_id="ftp", manager=False, password="pw"):
    return LoginRequest(username, password, service_id, "ftp", peer, manager=manager)


def refusal(result_of, policy: SecurityPolicy, login: LoginRequest):
    try:
        result_of(defer.ensureDeferred(policy.check_before_login(login)))
    except LoginFailed as failure:
        return failure.reason
    return None


def fail(result_of, policy: SecurityPolicy, login: LoginRequest, reason="invalid-password"):
    result_of(defer.ensureDeferred(policy.record(login, "failure", reason)))


# -- the configuration ------------------------------------------------------------------------


def test_default_policy_exists_with_the_documented_defaults():
    """Without a section, DEFAULT-SECURITY-POLICY bans after 5 failures for 3600 s and denies nothing."""
    conf = parse_configuration("[services/f]\ntype = ftp\nport = 21\n", "/tmp/a.ini", "/tmp", {})
    policy = conf.security_policies["DEFAULT-SECURITY-POLICY"]
    assert (policy.source_ip_ban_after_count, policy.source_ip_ban_interval) == (5, 3600)
    assert policy.deny_usernames == policy.deny_administrators == policy.source_ip_filter == ()
    assert conf.services["f"].proxy_protocol is False


def test_a_service_may_name_a_defined_policy_only():
    """security_policy naming no [security-policies/ID] is an error listing the defined ones."""
    with pytest.raises(ConfigError) as error:
        parse_configuration("[services/f]\ntype = ftp\nport = 21\nsecurity_policy = strict\n", "/tmp/a.ini", "/tmp", {})
    assert "unknown security policy 'strict'" in str(error.value)
    assert "DEFAULT-SECURITY-POLICY" in str(error.value)


def test_named_policy_and_proxy_protocol_load():
    """A named policy is built from its section and proxy_protocol = yes reaches the service settings."""
    conf = configuration(POLICIES + "\n[services/proxied]\ntype = ssh\nport = 2424\nproxy_protocol = yes\n")
    assert conf.security_policies["lenient"].source_ip_ban_after_count == 0
    assert [str(net) for net in conf.security_policies["lenient"].source_ip_filter] == ["192.0.2.0/24", "2001:db8::/32"]
    assert conf.services["proxied"].proxy_protocol is True


def test_deny_usernames_one_per_line_keeps_commas_and_bad_expressions_name_their_line():
    """One expression per line may hold a comma; an invalid one is an error on its own line."""
    conf = configuration("\n[security-policies/x]\ndeny_usernames =\n    m/^a{1,3}$/\n    root\n")
    assert [e.text for e in conf.security_policies["x"].deny_usernames] == ["m/^a{1,3}$/", "root"]
    with pytest.raises(ConfigError) as error:
        configuration("\n[security-policies/x]\ndeny_usernames =\n    root\n    m/(/\n")
    [problem] = error.value.problems
    assert problem.option == "deny_usernames" and "not a valid regular expression" in problem.message
    assert problem.line == BASE.count("\n") + 5  # the line of m/(/


@pytest.mark.parametrize(
    "text, expected",
    [
        ("memory", "memory"),
        ("redis://127.0.0.1:6380/2", "redis://127.0.0.1:6380/2"),
        ("redis://cache.example.com", "redis://cache.example.com:6379/0"),
        ("redis://[::1]:7000/1", "redis://[::1]:7000/1"),
    ],
)
def test_server_state_accepts_memory_and_redis_urls(text, expected):
    """[server] state is memory or redis://HOST[:PORT][/DB], kept in canonical form."""
    conf = parse_configuration(f"[server]\nstate = {text}\n", "/tmp/a.ini", "/tmp", {})
    assert conf.server.state == expected


@pytest.mark.parametrize("text", ["disk", "redis://", "redis://h:99999/0", "rediss://h/0", "redis://h/0?x=1", "redis://:pw@h/0"])
def test_server_state_refuses_anything_else(text):
    """Any other state is a configuration error saying what is allowed."""
    with pytest.raises(ConfigError) as error:
        parse_configuration(f"[server]\nstate = {text}\n", "/tmp/a.ini", "/tmp", {})
    assert "expected memory or redis://HOST:PORT/DB" in str(error.value) or "port must be" in str(error.value)


def test_redis_keys_cannot_collide_between_scopes_and_addresses():
    """Policy IDs and IPv6 addresses hold ':' but the quoted key parts keep them apart."""
    assert redis_key("ban", "a:1", "2::3") != redis_key("ban", "a", "1:2::3")
    assert redis_key("ban", "P", "192.0.2.1") == "sftpauth:ban:P:192.0.2.1"


# -- the memory ban store ---------------------------------------------------------------------


def test_memory_store_bans_at_the_limit_once_and_for_the_interval(clock, result_of):
    """The failure reaching the limit bans (banned_now once); the ban ends after the interval."""
    store = MemoryBanStore(clock)
    counts = [result_of(store.add_failure("P", "a", 3, 60)) for _ in range(4)]
    assert [(c.count, c.banned_now) for c in counts] == [(1, False), (2, False), (3, True), (0, False)]
    assert result_of(store.ban_left("P", "a")) == 60
    clock.advance(59)
    assert result_of(store.ban_left("P", "a")) == pytest.approx(1)
    clock.advance(1)
    assert result_of(store.ban_left("P", "a")) == 0
    assert result_of(store.add_failure("P", "a", 3, 60)).count == 1


def test_memory_store_forgets_a_count_after_the_interval_and_on_reset(clock, result_of):
    """A counter lives interval seconds after its last failure; reset() forgets it at once."""
    store = MemoryBanStore(clock)
    result_of(store.add_failure("P", "a", 3, 60))
    clock.advance(61)
    assert result_of(store.add_failure("P", "a", 3, 60)).count == 1
    result_of(store.reset("P", "a"))
    assert result_of(store.add_failure("P", "a", 3, 60)).count == 1


def test_memory_store_scopes_are_separate(clock, result_of):
    """Two policies count the same address separately."""
    store = MemoryBanStore(clock)
    result_of(store.add_failure("P", "a", 2, 60))
    assert result_of(store.add_failure("Q", "a", 2, 60)).count == 1


def test_memory_store_is_bounded(clock, result_of):
    """Past max_entries the counters closest to expiring are forgotten, never more than the bound kept."""
    store = MemoryBanStore(clock, max_entries=10)
    for number in range(100):
        clock.advance(0.01)
        result_of(store.add_failure("P", f"10.0.0.{number}", 5, 60))
    assert len(store._failures) == 10
    assert result_of(store.add_failure("P", "10.0.0.99", 5, 60)).count == 2


# -- the policy -----------------------------------------------------------------------------------


def test_consecutive_failures_ban_the_address_on_every_service_of_the_policy(policies, recorder, result_of):
    """Three failures (FTP and SFTP mixed) ban the address on both; the ban is one audit event."""
    ftp, sftp = policies.for_service("ftp"), policies.for_service("sftp")
    assert ftp is sftp
    for service in ("ftp", "sftp", "ftp"):
        assert refusal(result_of, ftp, request(service_id=service)) is None
        fail(result_of, ftp, request(service_id=service))
    assert refusal(result_of, sftp, request(service_id="sftp")) == "banned"
    assert refusal(result_of, ftp, request(peer="198.51.100.8")) is None
    [ban] = recorder.of("ban")
    assert ban["peer"] == "198.51.100.7" and ban["failures"] == 3 and ban["policy"] == "DEFAULT-SECURITY-POLICY"
    assert ban["interval"] == 60 and ban["service"] == "ftp"


def test_a_success_resets_the_count(policies, result_of):
    """Two failures, a success, two failures: no ban."""
    policy = policies.for_service("ftp")
    for outcome in ("failure", "failure", "success", "failure", "failure"):
        result_of(defer.ensureDeferred(policy.record(request(), outcome, "invalid-password" if outcome == "failure" else "")))
    assert refusal(result_of, policy, request()) is None


@pytest.mark.parametrize("reason", sorted(NOT_COUNTED))
def test_server_side_failures_never_count(policies, result_of, reason):
    """Failures that are the server's fault (LDAP down, internal errors...) never ban anybody."""
    policy = policies.for_service("ftp")
    for _ in range(10):
        fail(result_of, policy, request(), reason)
    assert refusal(result_of, policy, request()) is None


def test_zero_never_bans(policies, result_of):
    """source_ip_ban_after_count = 0 disables bans."""
    policy = policies.for_service("other")
    for _ in range(20):
        fail(result_of, policy, request(peer="192.0.2.5", service_id="other"))
    assert refusal(result_of, policy, request(peer="192.0.2.5", service_id="other")) is None


def test_ban_end_is_an_audit_event(policies, recorder, clock, result_of):
    """The node that started a ban audits its end when the interval is over."""
    policy = policies.for_service("ftp")
    for _ in range(3):
        fail(result_of, policy, request())
    clock.advance(59)
    assert recorder.of("ban-ended") == []
    clock.advance(1)
    [ended] = recorder.of("ban-ended")
    assert ended["peer"] == "198.51.100.7"
    assert refusal(result_of, policy, request()) is None


def test_stop_forgets_pending_ban_ends(policies, recorder, clock, result_of):
    """Stopping the policies cancels the ban-end timers (no event after shutdown)."""
    policy = policies.for_service("ftp")
    for _ in range(3):
        fail(result_of, policy, request())
    policies.stop()
    clock.advance(120)
    assert recorder.of("ban-ended") == [] and clock.getDelayedCalls() == []


@pytest.mark.parametrize(
    "username",
    ["root", "ROOT", " root", "root ", "admin", "Administrator", "ｒｏｏｔ", "r\u200boot", "ro\u00adot", "\u2060root\ufeff"],
)
def test_denied_usernames_match_case_and_space_insensitively(policies, result_of, username):
    """deny_usernames globs match whatever case, spacing, width or invisible characters a directory would ignore."""
    assert refusal(result_of, policies.for_service("ftp"), request(username=username)) == "denied-username"


def test_deny_lists_apply_to_their_kind_of_login_only(policies, result_of):
    """deny_usernames is for file transfer logins, deny_administrators for Web Manager logins."""
    policy = policies.for_service("ftp")
    assert refusal(result_of, policy, request(username="root", manager=True)) is None
    assert refusal(result_of, policy, request(username="ops-anna", manager=True)) == "denied-administrator"
    assert refusal(result_of, policy, request(username="ops-anna")) is None


def test_source_filter_refuses_other_addresses(policies, result_of):
    """source_ip_filter admits its networks (IPv4-mapped IPv6 too) and refuses the rest."""
    policy = policies.for_service("other")
    assert refusal(result_of, policy, request(peer="192.0.2.200", service_id="other")) is None
    assert refusal(result_of, policy, request(peer="::ffff:192.0.2.9", service_id="other")) is None
    assert refusal(result_of, policy, request(peer="2001:db8::1", service_id="other")) is None
    assert refusal(result_of, policy, request(peer="198.51.100.1", service_id="other")) == "source-filtered"
    assert refusal(result_of, policy, request(peer="not-an-ip", service_id="other")) == "source-filtered"
    assert refusal(result_of, policy, request(peer="", service_id="other")) is None  # test-login: no address


def test_an_ipv4_mapped_network_in_a_filter_admits_plain_ipv4_clients(clock, recorder, result_of):
    """QA, session 26: ``::ffff:192.0.2.0/120`` was kept as IPv6 and matched nothing: clients are plain IPv4."""
    conf = configuration(POLICIES.replace("192.0.2.0/24, 2001:db8::/32", "::ffff:192.0.2.0/120, ::ffff:203.0.113.5"))
    assert [str(net) for net in conf.security_policies["lenient"].source_ip_filter] == ["192.0.2.0/24", "203.0.113.5/32"]
    policy = SecurityPolicies(conf, MemoryBanStore(clock), recorder.audit, clock).for_service("other")
    assert refusal(result_of, policy, request(peer="192.0.2.9", service_id="other")) is None
    assert refusal(result_of, policy, request(peer="::ffff:203.0.113.5", service_id="other")) is None
    assert refusal(result_of, policy, request(peer="198.51.100.1", service_id="other")) == "source-filtered"


def test_connection_refusals_are_audited_without_flooding(policies, recorder, clock, result_of):
    """A refused connection is audited once a minute per service, address and reason, with the repeats."""
    policy = policies.for_service("other")
    for _ in range(5):
        assert result_of(policy.check_connection("other", "198.51.100.1")) == "source-filtered"
    assert len(recorder.of("connection")) == 1
    clock.advance(59)
    assert len(recorder.of("connection")) == 1
    clock.advance(1)  # the minute is over: the 4 not written are told even though none follows (QA)
    first, summary = recorder.of("connection")
    assert (first["repeats"], first.get("summary")) == (0, None)
    assert (summary["repeats"], summary["summary"]) == (4, True)
    assert summary["outcome"] == "refused" and summary["reason"] == "source-filtered"
    assert summary["peer"] == "198.51.100.1" and summary["service"] == "other"
    clock.advance(60)
    assert len(recorder.of("connection")) == 2  # nothing more to tell: no empty summary
    assert result_of(policy.check_connection("other", "198.51.100.1")) == "source-filtered"
    clock.advance(30)
    assert result_of(policy.check_connection("other", "198.51.100.1")) == "source-filtered"  # counted
    clock.advance(30)
    assert [(event["repeats"], event.get("summary")) for event in recorder.of("connection")[2:]] == [(0, None), (1, True)]
    assert result_of(policy.check_connection("other", "192.0.2.1")) is None


def test_refusals_counted_at_the_stop_are_audited_then(policies, recorder, result_of):
    """Stopping writes the summary of the refusals not audited yet: the audit log loses none."""
    policy = policies.for_service("other")
    for _ in range(3):
        assert result_of(policy.check_connection("other", "198.51.100.1")) == "source-filtered"
    policies.stop()
    assert [(event["repeats"], event.get("summary")) for event in recorder.of("connection")] == [(0, None), (2, True)]


def test_banned_address_is_refused_at_connection(policies, result_of):
    """check_connection answers "banned" for a banned address and None for others."""
    policy = policies.for_service("ftp")
    for _ in range(3):
        fail(result_of, policy, request())
    assert result_of(policy.check_connection("ftp", "198.51.100.7")) == "banned"
    assert result_of(policy.check_connection("ftp", "::ffff:198.51.100.7")) == "banned"
    assert result_of(policy.check_connection("ftp", "198.51.100.9")) is None


def test_an_ipv6_client_is_its_64_for_bans_at_login_and_at_connection(policies, recorder, result_of):
    """QA: each IPv6 address was banned alone, so a client holding a /64 guessed without limit from a fresh address
    each time. The /64 is the client: its failures add up, and the ban holds for all of it."""
    policy = policies.for_service("ftp")
    for host in ("2001:db8::100", "2001:db8::101", "2001:db8::ffff:1"):
        assert refusal(result_of, policy, request(peer=host)) is None
        fail(result_of, policy, request(peer=host))
    assert refusal(result_of, policy, request(peer="2001:db8::67")) == "banned"
    assert result_of(policy.check_connection("ftp", "2001:db8:0:0:abcd::1")) == "banned"
    assert refusal(result_of, policy, request(peer="2001:db8:0:1::100")) is None  # the next /64: another client
    [ban] = recorder.of("ban")
    assert ban["peer"] == "2001:db8::/64" and ban["failures"] == 3
    refused = [event for event in recorder.of("connection") if event["reason"] == "banned"]
    assert refused[0]["peer"] == "2001:db8::abcd:0:0:1"  # the address itself is audited


def test_client_key():
    assert client_key("198.51.100.7") == "198.51.100.7"
    assert client_key("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert client_key("::1") == "::/64"
    assert client_key("") == ""


def test_plain_address_is_what_logs_and_audit_events_show():
    assert plain_address("::ffff:10.1.2.3") == "10.1.2.3"
    assert plain_address("2001:DB8::1") == "2001:db8::1"
    assert plain_address("unix-socket") == "unix-socket" and plain_address("") == ""


def test_normalise_address():
    """Mapped IPv6 becomes IPv4, zones go, non-addresses give ""."""
    assert normalise_address("::ffff:10.1.2.3") == "10.1.2.3"
    assert normalise_address("fe80::1%eth0") == "fe80::1"
    assert normalise_address("2001:DB8::1") == "2001:db8::1"
    assert normalise_address("") == normalise_address("x") == normalise_address(None) == ""


# -- the chain ------------------------------------------------------------------------------------


class CountingMethod:
    """A method that records every call and rejects the password."""

    id = "DEFAULT-AUTHENTICATION"

    def __init__(self):
        self.calls = 0

    def authenticate(self, login):
        self.calls += 1
        return defer.fail(LoginFailed("invalid-password", "wrong"))


@pytest.fixture
def chain(policies, recorder, run_in_thread):
    method = CountingMethod()
    conf = configuration(POLICIES)
    chain = AuthenticationChain(conf, {"DEFAULT-AUTHENTICATION": method}, recorder.audit, run_in_thread, policies=policies)
    return chain, method


def chain_reason(result_of, chain, login, clock=None) -> str:
    """The refusal's reason; with ``clock``, a refusal that is slowed down is waited for (and must be)."""
    answer = chain.requestAvatarId(login)
    if clock is not None and not answer.called:
        clock.advance(FLOOD_REFUSAL_DELAY)
    with pytest.raises(LoginFailed) as failure:
        result_of(answer)
    assert not isinstance(failure.value, UnknownUser)
    return failure.value.reason


def test_chain_refuses_denied_usernames_before_any_method(chain, recorder, result_of):
    """A denied username never reaches a method; the audit reason says why."""
    chain, method = chain
    assert chain_reason(result_of, chain, request(username="root")) == "denied-username"
    assert method.calls == 0
    assert recorder.of("authentication")[-1]["reason"] == "denied-username"


def test_chain_counts_failures_and_refuses_banned_addresses_before_any_method(chain, recorder, result_of, clock):
    """After the limit, the chain refuses as banned without calling a method, and answers that one second late."""
    chain, method = chain
    for _ in range(3):
        assert chain_reason(result_of, chain, request()) == "invalid-password"
    assert method.calls == 3
    refused = chain.requestAvatarId(request())
    assert not refused.called  # answered one second late
    clock.advance(FLOOD_REFUSAL_DELAY)
    with pytest.raises(LoginFailed) as failure:
        result_of(refused)
    assert failure.value.reason == "banned"
    assert method.calls == 3
    reasons = [event["reason"] for event in recorder.of("authentication")]
    assert reasons == ["invalid-password"] * 3 + ["banned"]
    assert [event["event"] for event in recorder.events].index("ban") == 3


def test_chain_counts_invalid_input_towards_the_ban(chain, result_of, clock):
    """A flood of absurd usernames (100 KB, control characters) bans like wrong passwords."""
    chain, method = chain
    for username in ("x" * 100_000, "a\udcffb", "bad\x00"):
        assert chain_reason(result_of, chain, request(username=username)) == "invalid-username"
    assert chain_reason(result_of, chain, request(), clock) == "banned"
    assert method.calls == 0


# -- the connection guard ---------------------------------------------------------------------------


class Echo(Protocol):
    """Records what the guarded protocol sees."""

    def __init__(self):
        self.started = False
        self.received = b""
        self.lost = False
        self.peer = None

    def connectionMade(self):
        self.started = True
        self.peer = self.transport.getPeer()
        self.transport.write(b"banner\r\n")

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.lost = True


class EchoFactory(Factory):
    def __init__(self):
        self.built: list[Echo] = []

    def buildProtocol(self, addr):
        protocol = Echo()
        protocol.factory = self
        self.built.append(protocol)
        return protocol


class FixedPolicy:
    """A policy whose answer the test decides (None, a reason, or a Deferred)."""

    def __init__(self, answer=None):
        self.answer = answer
        self.asked: list[str] = []

    def check_connection(self, service_id, host):
        self.asked.append(host)
        if isinstance(self.answer, defer.Deferred):
            return self.answer
        return defer.succeed(self.answer)

    def hold_connection(self, service_id, host):
        return ""  # no maximum_connections_per_address

    def release_connection(self, address):
        raise AssertionError("nothing was held")


def service_settings(kind="ftp", proxy=False, limit=10000, sources=""):
    conf = configuration(
        f"\n[services/guarded]\ntype = {kind}\nport = 2525\nproxy_protocol = {'yes' if proxy else 'no'}\n"
        f"maximum_concurrent_connections = {limit}\nproxy_protocol_sources = {sources}\n"
    )
    return conf.services["guarded"]


def connect(factory, peer=("203.0.113.9", 40000)):
    transport = StringTransport(peerAddress=address.IPv4Address("TCP", *peer), hostAddress=address.IPv4Address("TCP", "10.0.0.1", 21))
    guard = factory.buildProtocol(transport.getPeer())
    guard.makeConnection(transport)
    return guard, transport


def v2_header(source="198.51.100.44", destination="10.9.9.9", ports=(5555, 21), command=0x21) -> bytes:
    body = socket.inet_aton(source) + socket.inet_aton(destination) + struct.pack("!HH", *ports)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([command, 0x11]) + struct.pack("!H", len(body)) + body


def test_guard_refuses_with_a_constant_line_and_never_starts_the_protocol(clock):
    """A refused connection gets the service's short line, is closed, and the protocol never runs."""
    services = EchoFactory()
    factory = ConnectionGuardFactory(services, service_settings("ftp"), clock, FixedPolicy("banned"))
    guard, transport = connect(factory)
    assert transport.value() == b"421 Connection refused.\r\n" and transport.disconnecting
    guard.dataReceived(b"USER x\r\n")
    guard.connectionLost(None)
    assert not services.built[0].started and not services.built[0].lost
    assert factory.open_connections == 0 and factory.protocols == {}


def test_guard_refusal_on_ssh_is_a_pre_version_line_and_nothing_on_tls_services(clock):
    """SSH gets a line before any version string; TLS-first services are just closed."""
    _, ssh = connect(ConnectionGuardFactory(EchoFactory(), service_settings("ssh"), clock, FixedPolicy("banned")))
    _, https = connect(ConnectionGuardFactory(EchoFactory(), service_settings("manager"), clock, FixedPolicy("banned")))
    assert ssh.value() == b"Connection refused.\r\n" and https.value() == b""
    assert https.disconnecting


def test_guard_waits_for_an_asynchronous_decision_with_reading_paused(clock):
    """While the policy asks Redis the transport is paused, early bytes are kept, then delivered in order."""
    answer = defer.Deferred()
    services = EchoFactory()
    guard, transport = connect(ConnectionGuardFactory(services, service_settings(), clock, FixedPolicy(answer)))
    assert transport.producerState == "paused" and not services.built[0].started
    guard.dataReceived(b"USER a")
    guard.dataReceived(b"lice\r\n")
    answer.callback(None)
    assert transport.producerState == "producing"
    assert services.built[0].started and services.built[0].received == b"USER alice\r\n"
    assert transport.value() == b"banner\r\n"


def test_guard_enforces_the_connection_limit(clock):
    """Past maximum_concurrent_connections a connection is closed; closing one frees a place."""
    factory = ConnectionGuardFactory(EchoFactory(), service_settings(limit=1), clock, None)
    first, _ = connect(factory)
    _, second = connect(factory)
    assert second.disconnecting and factory.refused == 1
    first.connectionLost(None)
    _, third = connect(factory)
    assert not third.disconnecting and factory.open_connections == 1


def test_a_refusal_for_the_connection_limit_gets_the_refusal_line_and_is_audited(clock, recorder):
    """QA: past maximum_concurrent_connections the client got a silent close and the audit log nothing. It now
    gets the service's refusal line, and a 'connection' event (throttled as the policy's other refusals)."""
    policy = capped_policy(clock, recorder, extra="")
    factory = ConnectionGuardFactory(EchoFactory(), service_settings(limit=1), clock, policy)
    connect(factory)
    _, second = connect(factory, peer=("198.51.100.7", 40001))
    _, third = connect(factory, peer=("198.51.100.7", 40002))
    assert second.value() == third.value() == b"421 Connection refused.\r\n" and second.disconnecting
    [refused] = recorder.of("connection")  # the second one within the minute is counted, not written
    assert (refused["peer"], refused["reason"], refused["outcome"], refused["service"]) == (
        "198.51.100.7", "maximum-concurrent-connections", "refused", "guarded")
    ssh_factory = ConnectionGuardFactory(EchoFactory(), service_settings("ssh", limit=1), clock, None)
    connect(ssh_factory)
    _, ssh = connect(ssh_factory)
    assert ssh.value() == b"Connection refused.\r\n" and ssh.disconnecting  # also without a policy


def test_refusals_over_the_connection_limit_log_one_line_per_interval_with_the_count(clock):
    """QA: each refused connection over maximum_concurrent_connections logged a warning, so a flood wrote
    thousands of lines. One line every PROBLEM_LOG_INTERVAL seconds now, saying how many were not logged."""
    from twisted.logger import formatEvent

    from log_capture import captured_logs
    from sftpauth.listening import PROBLEM_LOG_INTERVAL

    factory = ConnectionGuardFactory(EchoFactory(), service_settings(limit=1), clock, None)
    connect(factory)
    with captured_logs() as events:
        for port in range(40001, 40051):
            _, refused = connect(factory, peer=("198.51.100.7", port))
            assert refused.disconnecting
        clock.advance(PROBLEM_LOG_INTERVAL)  # the flood is over: its last 49 are told although nothing follows (QA)
        clock.advance(PROBLEM_LOG_INTERVAL)
        connect(factory, peer=("198.51.100.8", 40100))
        connect(factory, peer=("198.51.100.8", 40101))
        factory.close_connections()  # a stop tells the one not logged yet
    lines = [formatEvent(event) for event in events if "maximum_concurrent_connections" in formatEvent(event)]
    assert lines == [
        "service guarded: refusing a connection from 198.51.100.7: maximum_concurrent_connections (1) reached",
        "service guarded: refused 49 more since the last line: maximum_concurrent_connections (1) reached",
        "service guarded: refusing a connection from 198.51.100.8: maximum_concurrent_connections (1) reached",
        "service guarded: refused 1 more since the last line: maximum_concurrent_connections (1) reached",
    ]
    assert factory.refused == 52


class Goodbye(Echo):
    """A protocol with the shutdown hook FTP and SSH have."""

    def shutting_down(self):
        self.transport.write(b"bye\r\n")
        self.transport.loseConnection()


def test_closing_connections_says_goodbye_and_cuts_off_clients_that_stay(clock):
    """A stopping service ends each connection: goodbye and close, abort after SHUTDOWN_GRACE; fires once all are lost."""
    services = EchoFactory()
    kinds = [Goodbye, Echo]
    services.buildProtocol = lambda addr: kinds.pop(0)()
    factory = ConnectionGuardFactory(services, service_settings(), clock, None)
    polite, polite_transport = connect(factory)
    plain, plain_transport = connect(factory)  # no shutting_down(): just closed
    closed = factory.close_connections()
    assert polite_transport.value() == b"banner\r\nbye\r\n" and polite_transport.disconnecting
    assert plain_transport.value() == b"banner\r\n" and plain_transport.disconnecting and not plain_transport.disconnected
    polite.connectionLost(None)
    assert not closed.called
    clock.advance(SHUTDOWN_GRACE)
    assert plain_transport.disconnected  # aborted: the client did not close its side
    assert not polite_transport.disconnected  # already gone: its timer was cancelled
    plain.connectionLost(None)
    assert closed.called and factory.protocols == {}


CAPPED = """
[services/other]
type = ftp
port = 2323

[security-policies/DEFAULT-SECURITY-POLICY]
maximum_connections_per_address = 2
"""


def capped_policy(clock, recorder, extra=CAPPED):
    return SecurityPolicies(configuration(extra), MemoryBanStore(clock), recorder.audit, clock).for_service("ftp")


def test_an_address_holds_at_most_the_maximum_of_connections_across_the_policys_services(clock, recorder):
    """Two connections of one address (on two services of the policy) are held; a third is refused and audited."""
    policy = capped_policy(clock, recorder)
    assert policy.hold_connection("ftp", "198.51.100.7") == "198.51.100.7"
    assert policy.hold_connection("other", "::ffff:198.51.100.7") == "198.51.100.7"  # the same address
    assert policy.hold_connection("ftp", "198.51.100.7") is None
    assert policy.hold_connection("ftp", "198.51.100.8") == "198.51.100.8"  # another address has its own count
    [refused] = recorder.of("connection")
    assert (refused["peer"], refused["reason"], refused["outcome"], refused["service"]) == (
        "198.51.100.7", "too-many-connections", "refused", "ftp")
    policy.release_connection("198.51.100.7")
    assert policy.hold_connection("ftp", "198.51.100.7") == "198.51.100.7"


def test_the_connections_of_an_ipv6_client_are_counted_by_its_64(clock, recorder):
    """QA: a client could hold maximum_connections_per_address from each address of its /64."""
    policy = capped_policy(clock, recorder)
    assert policy.hold_connection("ftp", "2001:db8::1") == "2001:db8::/64"
    assert policy.hold_connection("ftp", "2001:db8::2") == "2001:db8::/64"
    assert policy.hold_connection("ftp", "2001:db8::3") is None
    assert policy.hold_connection("ftp", "2001:db8:0:1::3") == "2001:db8:0:1::/64"
    [refused] = recorder.of("connection")
    assert (refused["peer"], refused["reason"]) == ("2001:db8::3", "too-many-connections")
    policy.release_connection("2001:db8::/64")
    assert policy.hold_connection("ftp", "2001:db8::4") == "2001:db8::/64"


def test_no_maximum_of_connections_counts_nothing(clock, recorder):
    """maximum_connections_per_address = 0 (the default), or a connection without an IP address: never refused."""
    policy = capped_policy(clock, recorder, extra="")
    assert policy.settings.maximum_connections_per_address == 0
    assert all(policy.hold_connection("ftp", "198.51.100.7") == "" for _ in range(100))
    assert capped_policy(clock, recorder).hold_connection("ftp", "/run/sock") == ""
    assert recorder.of("connection") == []


def test_guard_refuses_an_address_over_its_maximum_and_frees_the_place_when_one_closes(clock, recorder):
    """The third connection of one address gets the constant refusal line and never starts the protocol."""
    services = EchoFactory()
    factory = ConnectionGuardFactory(services, service_settings("ftp"), clock, capped_policy(clock, recorder))
    first, _ = connect(factory)
    connect(factory)
    third, refused = connect(factory)
    assert refused.value() == b"421 Connection refused.\r\n" and refused.disconnecting
    third.connectionLost(None)
    assert [protocol.started for protocol in services.built] == [True, True, False]
    first.connectionLost(None)
    _, fourth = connect(factory)
    assert fourth.value() == b"banner\r\n" and not fourth.disconnecting


def test_the_maximum_counts_the_proxy_headers_client_not_the_proxy(clock, recorder):
    """Behind proxy_protocol, two clients of one proxy each have their own count."""
    factory = ConnectionGuardFactory(EchoFactory(), service_settings(proxy=True), clock, capped_policy(clock, recorder))
    for client in ("198.51.100.1", "198.51.100.1", "198.51.100.2", "198.51.100.2", "198.51.100.1"):
        guard, transport = connect(factory, peer=("10.0.0.5", 40000))
        guard.dataReceived(f"PROXY TCP4 {client} 10.9.9.9 5555 21\r\n".encode())
    assert transport.value() == b"421 Connection refused.\r\n"  # the third of 198.51.100.1
    assert [event["peer"] for event in recorder.of("connection")] == ["198.51.100.1"]


def test_proxy_v1_header_gives_the_client_address_to_policy_and_protocol(clock):
    """With proxy_protocol, getPeer() is the header's source everywhere; getHost() stays ours."""
    policy = FixedPolicy(None)
    services = EchoFactory()
    guard, transport = connect(ConnectionGuardFactory(services, service_settings(proxy=True), clock, policy))
    assert transport.value() == b"" and not services.built[0].started  # nothing before the header
    guard.dataReceived(b"PROXY TCP4 198.51.100.44 10.9.9.9 5555 21\r\nUSER bob\r\n")
    assert policy.asked == ["198.51.100.44"]
    protocol = services.built[0]
    assert protocol.peer.host == "198.51.100.44" and protocol.received == b"USER bob\r\n"
    assert guard.getHost().host == "10.0.0.1"


def test_proxy_protocol_sources_refuse_a_header_from_any_other_peer(clock):
    """Only the listed proxies may claim a client address: another peer is closed before its header is read."""
    policy = FixedPolicy(None)
    services = EchoFactory()
    factory = ConnectionGuardFactory(services, service_settings(proxy=True, sources="10.0.0.0/24, 2001:db8::1"), clock, policy)
    guard, transport = connect(factory, peer=("203.0.113.9", 40000))  # a client reaching the port directly
    assert transport.disconnecting and transport.value() == b""
    guard.dataReceived(b"PROXY TCP4 10.0.0.7 10.9.9.9 5555 21\r\nUSER bob\r\n")
    assert policy.asked == [] and not services.built[0].started
    guard.connectionLost(None)
    assert factory.open_connections == 0
    proxied, transport = connect(factory, peer=("10.0.0.5", 40001))  # the proxy
    proxied.dataReceived(b"PROXY TCP4 198.51.100.44 10.9.9.9 5555 21\r\nUSER bob\r\n")
    assert not transport.disconnecting and policy.asked == ["198.51.100.44"]
    assert services.built[-1].received == b"USER bob\r\n"


def test_proxy_protocol_sources_without_proxy_protocol_is_a_warning():
    conf = configuration("\n[services/plain]\ntype = ftp\nport = 2526\nproxy_protocol_sources = 10.0.0.1\n")
    assert [(w.option, w.message) for w in conf.warnings] == [("proxy_protocol_sources", "ignored: proxy_protocol = no")]


def test_proxy_v2_header_split_byte_by_byte(clock):
    """A v2 header arriving one byte at a time is read like one arriving whole."""
    policy = FixedPolicy(None)
    services = EchoFactory()
    guard, transport = connect(ConnectionGuardFactory(services, service_settings(proxy=True), clock, policy))
    for byte in v2_header() + b"SSH-2.0-x\r\n":
        guard.dataReceived(bytes([byte]))
    assert policy.asked == ["198.51.100.44"]
    assert services.built[0].received == b"SSH-2.0-x\r\n"


def test_proxy_v2_local_command_keeps_the_proxy_address(clock):
    """A LOCAL header (the proxy's health check) keeps the TCP peer as the client."""
    policy = FixedPolicy(None)
    guard, _ = connect(ConnectionGuardFactory(EchoFactory(), service_settings(proxy=True), clock, policy))
    guard.dataReceived(v2_header(command=0x20))
    assert policy.asked == ["203.0.113.9"]


def test_proxy_v1_unknown_keeps_the_proxy_address(clock):
    """HAProxy sends ``PROXY UNKNOWN`` for a client on a unix socket: accepted, the TCP peer stays the client."""
    policy = FixedPolicy(None)
    services = EchoFactory()
    guard, transport = connect(ConnectionGuardFactory(services, service_settings(proxy=True), clock, policy))
    guard.dataReceived(b"PROXY UNKNOWN\r\nUSER bob\r\n")
    assert not transport.disconnecting
    assert policy.asked == ["203.0.113.9"] and services.built[0].received == b"USER bob\r\n"


def v2_ipv6_header(source: str, destination: str = "2001:db8::1", family=0x21) -> bytes:
    body = socket.inet_pton(socket.AF_INET6, source) + socket.inet_pton(socket.AF_INET6, destination)
    body += struct.pack("!HH", 5555, 22)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


@pytest.mark.parametrize("header", [
    v2_ipv6_header("2001:db8::66"),
    b"PROXY TCP6 2001:db8::66 2001:db8::1 5555 22\r\n",
    b"PROXY TCP6 2001:db8:0:0:0:0:0:66 2001:db8::1 5555 22\r\n",
])
def test_an_ipv6_client_has_one_spelling_whichever_header_names_it(clock, header):
    """v1 and v2, short or full: the client is ``2001:db8::66`` for the policy, the protocol and the audit."""
    policy = FixedPolicy(None)
    services = EchoFactory()
    guard, _ = connect(ConnectionGuardFactory(services, service_settings(proxy=True), clock, policy))
    guard.dataReceived(header)
    assert policy.asked == ["2001:db8::66"] and services.built[0].peer.host == "2001:db8::66"


@pytest.mark.parametrize(
    "data",
    [b"USER alice\r\n", b"SSH-2.0-OpenSSH\r\n", b"PROXY TCP4 evil 10.0.0.1 1 2\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 x 2\r\n",
     b"PROXY " + b"A" * 200, b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c" + b"\x00" * 12,
     # what the specification does not allow: an address of the other family, ports out of range
     b"PROXY TCP4 2001:db8::9 127.0.0.1 1 2\r\n", b"PROXY TCP6 10.1.1.2 2001:db8::1 1 2\r\n",
     b"PROXY TCP4 10.1.1.2 127.0.0.1 99999 2\r\n", b"PROXY TCP4 10.1.1.2 127.0.0.1 1 -5\r\n",
     # v2, AF_UNIX: two 108-byte paths
     b"\r\n\r\n\x00\r\nQUIT\n\x21\x31\x00\xd8" + b"/tmp/a".ljust(108, b"\0") + b"/tmp/b".ljust(108, b"\0")],
)
def test_proxy_protocol_refuses_connections_without_a_valid_header(clock, data):
    """No header, a malformed or impossible one or a non-IP source closes the connection before the protocol runs."""
    services = EchoFactory()
    guard, transport = connect(ConnectionGuardFactory(services, service_settings(proxy=True), clock, FixedPolicy(None)))
    guard.dataReceived(data)
    assert transport.disconnected or transport.disconnecting
    assert not services.built[0].started


def test_proxy_header_timeout(clock):
    """A client that sends no header is closed after PROXY_HEADER_TIMEOUT seconds."""
    factory = ConnectionGuardFactory(EchoFactory(), service_settings(proxy=True), clock, FixedPolicy(None))
    guard, transport = connect(factory)
    clock.advance(PROXY_HEADER_TIMEOUT)
    assert transport.disconnected
    guard.connectionLost(None)
    assert factory.open_connections == 0 and clock.getDelayedCalls() == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=40), max_size=8), st.sampled_from(["v1", "v2"]))
def test_header_reader_any_split_gives_the_same_result(cuts, version):
    """Property: however the header and what follows are split, the reader gives one source and the rest."""
    header = b"PROXY TCP4 198.51.100.44 10.9.9.9 5555 21\r\n" if version == "v1" else v2_header()
    data = header + b"after"
    reader = ProxyHeaderReader()
    info, rest, position = None, b"", 0
    for cut in cuts + [len(data)]:
        piece, position = data[position : position + cut], position + cut
        if not piece:
            continue
        if info is None:
            info, rest = reader.feed(piece)
        else:
            rest += piece
    assert info.source.host == "198.51.100.44" and rest == b"after"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_header_reader_never_fails_otherwise_than_invalid_header(data):
    """Property: arbitrary bytes either wait for more, give a header, or raise InvalidHeader."""
    reader = ProxyHeaderReader()
    try:
        reader.feed(data)
    except InvalidHeader:
        pass


# -- shared state wiring ---------------------------------------------------------------------------


def test_memory_state_has_bans_and_redis_state_connects_lazily(clock):
    """build_state gives bans for memory, and for Redis an unstarted connection (nothing before start)."""
    memory = build_state("memory", clock)
    assert isinstance(memory.bans, MemoryBanStore) and memory.connection is None
    redis = build_state("redis://127.0.0.1:1/0", clock)
    assert isinstance(redis.connection, RedisConnection) and redis.connection.status == "connecting"
    assert redis.description == "redis://127.0.0.1:1/0" and redis.bans.local is not None


def test_state_url_parsing():
    """parse_state_url fills in the default port and database."""
    assert parse_state_url("redis://h") == RedisLocation("h", 6379, 0)
    assert parse_state_url("redis://h:1/15").url == "redis://h:1/15"


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/0?password=S3cretQ", "redis://user:S3cretQ@127.0.0.1/0", "redis://h/0?x=1&auth=S3cretQ"]
)
def test_a_state_url_error_never_shows_a_password(url):
    """QA, session 18: a password in the query string was echoed in check-config's error."""
    with pytest.raises(InvalidStateURL) as refused:
        parse_state_url(url)
    assert "S3cretQ" not in str(refused.value) and "***" in str(refused.value)


# -- fairness ----------------------------------------------------------------------------------------


def test_login_slots_let_two_logins_of_an_address_run_and_queue_the_rest(result_of):
    """Per address two logins run at once, later ones wait in order, other addresses never wait."""
    from sftpauth.auth.policy import LoginSlots

    slots = LoginSlots(in_progress=2, waiting=2)
    first, second = result_of(slots.acquire("192.0.2.1")), result_of(slots.acquire("192.0.2.1"))
    third, fourth = slots.acquire("192.0.2.1"), slots.acquire("::ffff:192.0.2.1")
    assert not third.called and not fourth.called
    with pytest.raises(LoginFailed) as refused:
        result_of(slots.acquire("192.0.2.1"))
    assert refused.value.reason == "too-many-logins"
    result_of(slots.acquire("192.0.2.2"))()  # another address: at once
    first()
    first()  # a second call gives nothing back twice
    assert third.called and not fourth.called
    second()
    assert fourth.called
    result_of(third)()
    result_of(fourth)()
    assert len(slots) == 0


def test_login_slots_count_an_ipv6_client_by_its_64(result_of):
    """QA: the fairness limit (two logins at a time) held per IPv6 address: a /64 got past it."""
    from sftpauth.auth.policy import LoginSlots

    slots = LoginSlots(in_progress=2, waiting=1)
    result_of(slots.acquire("2001:db8::1"))
    result_of(slots.acquire("2001:db8::2"))
    assert not slots.acquire("2001:db8::3").called  # waits its turn
    with pytest.raises(LoginFailed):
        result_of(slots.acquire("2001:db8::4"))
    result_of(slots.acquire("2001:db8:0:1::3"))  # another /64: at once
    assert result_of(slots.acquire(""))() is None  # no address (test-login): never limited


def waiting_chain(policies, recorder, run_in_thread):
    """A chain whose one method answers when the test fires the Deferreds in ``running``."""
    running = []

    class SlowMethod:
        id = "DEFAULT-AUTHENTICATION"

        def authenticate(self, login):
            answer = defer.Deferred()
            running.append(answer)
            return answer

    chain = AuthenticationChain(configuration(POLICIES), {"DEFAULT-AUTHENTICATION": SlowMethod()}, recorder.audit, run_in_thread, policies=policies)
    return chain, running


def test_chain_runs_at_most_two_logins_of_one_address_at_once(policies, recorder, run_in_thread, clock):
    """A flood of parallel logins from one address reaches the methods two at a time."""
    chain, running = waiting_chain(policies, recorder, run_in_thread)
    reasons = []
    flood = [chain.requestAvatarId(request()) for _ in range(6)]
    other = chain.requestAvatarId(request(peer="198.51.100.99"))
    for login in flood + [other]:
        login.addErrback(lambda failure: reasons.append(failure.value.reason))
    assert len(running) == 3  # two of the flood, and the other address at once
    running[0].errback(LoginFailed("invalid-password", "x"))
    assert len(running) == 4 and reasons == ["invalid-password"]
    # Let every login finish (none is left pending for the garbage collector to close).
    # Let every login finish (the ban makes the last ones "banned", answered after the flood delay),
    # so none is left pending for the garbage collector to close.
    while any(not answer.called for answer in running):
        next(answer for answer in running if not answer.called).errback(LoginFailed("invalid-password", "x"))
    clock.advance(60)
    assert len(reasons) == len(flood) + 1


def test_a_proxy_header_on_a_service_without_proxy_protocol_is_refused(clock):
    """Without proxy_protocol a connection starting with a PROXY header (v1 or v2) is closed before the protocol reads it."""
    for header in (b"PROXY TCP4 192.0.2.1 10.0.0.1 1 21\r\n", v2_header()):
        services = EchoFactory()
        guard, transport = connect(ConnectionGuardFactory(services, service_settings(), clock, FixedPolicy(None)))
        guard.dataReceived(header + b"USER x\r\n")
        assert transport.disconnected and services.built[0].received == b""
    services = EchoFactory()
    guard, transport = connect(ConnectionGuardFactory(services, service_settings(), clock, FixedPolicy(None)))
    guard.dataReceived(b"USER x\r\n")
    guard.dataReceived(b"PROXY later is just a command\r\n")
    assert not transport.disconnected and services.built[0].received.endswith(b"command\r\n")


class FakeRedis:
    """A RedisConnection stand-in: answers from a list, or fails like an unreachable Redis."""

    def __init__(self, answers=None):
        self.answers = list(answers or [])
        self.commands = []
        self.reported = []

    def execute(self, *command):
        self.commands.append(command)
        if not self.answers:
            from sftpauth.state import RedisUnavailable

            return defer.fail(RedisUnavailable("redis://x:1/0: not connected"))
        return defer.succeed(self.answers.pop(0))

    def report(self, failure, what):
        self.reported.append(what)


def test_redis_ban_store_uses_one_script_and_remembers_bans(clock, result_of):
    """A failure is one EVAL; a ban it reports is remembered so later checks need no round trip."""
    from sftpauth.state import RedisBanStore

    redis = FakeRedis([[1, 0, 0], [2, 1, 60_000]])
    store = RedisBanStore(redis, MemoryBanStore(clock))
    assert result_of(store.add_failure("P", "192.0.2.1", 2, 60)).count == 1
    banned = result_of(store.add_failure("P", "192.0.2.1", 2, 60))
    assert banned.banned_now and banned.ban_left == 60
    assert [command[0] for command in redis.commands] == ["EVAL", "EVAL"]
    assert redis.commands[0][3:5] == ("sftpauth:failures:P:192.0.2.1", "sftpauth:ban:P:192.0.2.1")
    assert result_of(store.ban_left("P", "192.0.2.1")) == 60
    assert len(redis.commands) == 2  # answered from what this node knows


def test_redis_ban_store_degrades_to_this_node_when_redis_cannot_answer(clock, result_of):
    """Without Redis, failures are counted and bans made by this node alone; nothing raises."""
    from sftpauth.state import RedisBanStore

    redis = FakeRedis()
    store = RedisBanStore(redis, MemoryBanStore(clock))
    assert result_of(store.ban_left("P", "192.0.2.1")) == 0
    counts = [result_of(store.add_failure("P", "192.0.2.1", 2, 60)) for _ in range(2)]
    assert counts[1].banned_now
    assert result_of(store.ban_left("P", "192.0.2.1")) == 60
    assert result_of(store.reset("P", "192.0.2.9")) is None
    assert "counting a failed login" in redis.reported


def test_redis_replay_store_fails_closed(result_of):
    """A claim Redis cannot answer fails (the TOTP login is refused); an answered one is True once."""
    from sftpauth.state import RedisReplayStore, RedisUnavailable

    assert result_of(RedisReplayStore(FakeRedis(["OK"])).claim("k", 90)) is True
    assert result_of(RedisReplayStore(FakeRedis([None])).claim("k", 90)) is False
    with pytest.raises(RedisUnavailable):
        result_of(RedisReplayStore(FakeRedis()).claim("k", 90))
    redis = FakeRedis(["OK"])
    result_of(RedisReplayStore(redis).claim("k", 0.0001))
    assert redis.commands == [("SET", "sftpauth:replay:k", "1", "PX", 1, "NX")]


def test_guard_sets_tcp_nodelay_on_every_accepted_connection(clock):
    """Small replies go out at once instead of waiting for the client's delayed ACK."""

    class TCPTransport(StringTransport):
        nodelay = False

        def setTcpNoDelay(self, enabled):
            self.nodelay = enabled

    transport = TCPTransport(peerAddress=address.IPv4Address("TCP", "203.0.113.9", 40000))
    factory = ConnectionGuardFactory(EchoFactory(), service_settings(), clock, None)
    factory.buildProtocol(transport.getPeer()).makeConnection(transport)
    assert transport.nodelay is True


def test_a_burst_of_good_logins_from_one_address_is_served_in_turn(policies, recorder, run_in_thread, tmp_path):
    """A batch host opening 100 sessions at once: all of them log in, two at a time, and nobody is refused."""
    chain, running = waiting_chain(policies, recorder, run_in_thread)
    outcomes = []
    for _ in range(100):
        chain.requestAvatarId(request()).addBoth(outcomes.append)
    account = Account(username="alice", method_id="DEFAULT-AUTHENTICATION", home_folder=str(tmp_path), permissions=FULL_CONTROL, groups=("g",))
    while any(not answer.called for answer in running):
        assert sum(not answer.called for answer in running) <= 2
        next(answer for answer in running if not answer.called).callback(account)
    assert len(outcomes) == 100
    assert [outcome for outcome in outcomes if isinstance(outcome, Failure)] == []


class _FakeLimits:
    """The few names of the resource module that raise_open_file_limit uses."""

    RLIMIT_NOFILE = 7
    RLIM_INFINITY = -1

    def __init__(self, soft: int, hard: int, refuse: bool = False):
        self.limit = (soft, hard)
        self.refuse = refuse

    def getrlimit(self, which):
        assert which == self.RLIMIT_NOFILE
        return self.limit

    def setrlimit(self, which, limit):
        if self.refuse:
            raise ValueError("not allowed")
        self.limit = limit


@pytest.mark.parametrize(
    "soft, hard, expected",
    [(1024, 524288, (1024, 524288)), (524288, 524288, (524288, 524288)), (1024, -1, (1024, 1 << 20))],
)
def test_the_soft_open_file_limit_is_raised_to_the_hard_one(soft, hard, expected):
    """1,024 open files are about 1,000 idle connections: the soft limit goes up to what the hard limit allows."""
    limits = _FakeLimits(soft, hard)
    assert raise_open_file_limit(limits) == expected
    assert limits.limit == (expected[1], hard)


def test_a_refused_raise_keeps_the_limit():
    """A system that refuses the raise leaves the limit as it was, and start-up goes on."""
    limits = _FakeLimits(1024, 4096, refuse=True)
    assert raise_open_file_limit(limits) == (1024, 1024)
    assert limits.limit == (1024, 4096)
