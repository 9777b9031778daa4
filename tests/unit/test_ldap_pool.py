"""LDAPServerPool health, failover and probes on a fake clock; TLS name checks; the TLS options.

The pool's connector is replaced by a scripted one, so every test runs on
``task.Clock`` with no network; the real connector is exercised against
real slapd servers in tests/integration/test_ldap_failover.py and
test_ldap_tls.py.
"""

from __future__ import annotations

import textwrap

import pytest
from twisted.internet import defer, task
from twisted.logger import LogLevel, formatEvent

from sftpauth.auth.credentials import LoginRequest
from sftpauth.auth.errors import LoginFailed
from sftpauth.auth.ldap.client import (
    DOWN,
    UNKNOWN,
    UP,
    Entry,
    LDAPResult,
    LDAPServerPool,
    LDAPUnavailable,
    ServerAddress,
)
from sftpauth.auth.ldap.method import LDAPMethod
from sftpauth.auth.ldap.tls import DISABLED, SYSTEM, CertificateSummary, TLSPolicy, check_name, load_certificate_bundle
from sftpauth.auth.trace import Trace
from sftpauth.config.errors import ConfigError
from sftpauth.config.loader import parse_configuration
from tests.integration.tls_certs import TestPKI
from log_capture import captured_logs

FIRST = ServerAddress("dc1.example.com", 389)
SECOND = ServerAddress("dc2.example.com", 3389)
THIRD = ServerAddress("::1", 389)
TIMEOUT = 5
RETRY = 30


class FakeConnection:
    """What the pool hands out; ``fail()`` plays a server lost in the middle of an operation."""

    def __init__(self, address, on_unavailable):
        self.server = address
        self.tls = None
        self._on_unavailable = on_unavailable
        self.closed = False
        self.uses = 0  # logins it served before: a kept connection when > 0

    async def root_dse(self) -> LDAPResult:
        return LDAPResult(0, "")

    def fail(self) -> LDAPUnavailable:
        error = LDAPUnavailable(
            f"{self.server}: connection lost during BIND", "lost", "connection lost during BIND", self.server
        )
        self._on_unavailable(self.server, error)
        return error

    def close(self) -> None:
        self.closed = True


class ScriptedConnector:
    """Each address is "up", "refused" or "silent" (no answer until ``timeout`` on the clock)."""

    def __init__(self, clock: task.Clock, behaviour: dict):
        self.clock = clock
        self.timeout = TIMEOUT
        self.behaviour = dict(behaviour)
        self.attempts: list[ServerAddress] = []
        self.tls = TLSPolicy("no", SYSTEM)

    async def open(self, address, on_unavailable=None, progress=None):
        self.attempts.append(address)
        what = self.behaviour[address]
        if what == "refused":
            raise LDAPUnavailable(f"{address}: connection refused", "refused", "connection refused")
        if what == "silent":
            await task.deferLater(self.clock, self.timeout, lambda: None)
            raise LDAPUnavailable(f"{address}: connection timed out after {self.timeout}s", "timeout")
        if progress is not None:
            progress.ready_seconds = 0.002
        return FakeConnection(address, on_unavailable)


def make_pool(behaviour: dict, addresses=(FIRST, SECOND)):
    clock = task.Clock()
    connector = ScriptedConnector(clock, behaviour)
    pool = LDAPServerPool(addresses, clock, TIMEOUT, retry_interval=RETRY, name="ldap", connector=connector)
    return pool, connector, clock


def fired(deferred: defer.Deferred):
    """The result of a Deferred that fired already; re-raises its failure."""
    results = []
    deferred.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], defer.Failure):
        results[0].raiseException()
    return results[0]


def connect(pool, trace=None) -> defer.Deferred:
    return defer.ensureDeferred(pool.connect(trace, "ldap"))


def statuses(pool) -> list[str]:
    return [state.status for state in pool.states()]


def test_servers_are_tried_in_order_and_a_refused_one_fails_over():
    """A refused first server is marked down with its error and the second one serves the login."""
    pool, connector, clock = make_pool({FIRST: "refused", SECOND: "up"})
    assert statuses(pool) == [UNKNOWN, UNKNOWN]
    trace = Trace(clock=clock.seconds)
    connection = fired(connect(pool, trace))
    assert connection.server == SECOND
    assert connector.attempts == [FIRST, SECOND]
    first, second = pool.states()
    assert (first.status, first.last_error) == (DOWN, "dc1.example.com:389: connection refused")
    assert second.status == UP and second.latency == pytest.approx(0.002)
    assert [step.action for step in trace.steps] == ["connect", "connect"]
    assert "connection refused" in trace.steps[0].detail
    assert "connected to dc2.example.com:3389" in trace.steps[1].detail


def test_servers_that_failed_the_login_are_not_tried_again_by_it():
    """connect(exclude=...): a server up for the pool but which failed this login is passed over; none left fails."""
    pool, connector, clock = make_pool({FIRST: "up", SECOND: "up"})
    assert fired(defer.ensureDeferred(pool.connect(None, "ldap", exclude={FIRST}))).server == SECOND
    assert connector.attempts == [SECOND]
    with pytest.raises(LDAPUnavailable):
        fired(defer.ensureDeferred(pool.connect(None, "ldap", exclude={FIRST, SECOND})))
    assert connector.attempts == [SECOND]


def test_a_down_server_is_skipped_while_another_is_up():
    """After one failure, the following logins never try the dead server (no attempt, no delay)."""
    pool, connector, clock = make_pool({FIRST: "refused", SECOND: "up"})
    fired(connect(pool))
    for _ in range(5):
        trace = Trace(clock=clock.seconds)
        assert fired(connect(pool, trace)).server == SECOND
        assert trace.steps[0].action == "skip"
        assert "dc1.example.com:389 is down" in trace.steps[0].detail
    assert connector.attempts.count(FIRST) == 1
    assert connector.attempts.count(SECOND) == 6


def test_only_the_first_login_that_meets_a_silent_server_pays_the_timeout():
    """A server that never answers costs the first login one timeout; the next ones reach the second server at once."""
    pool, connector, clock = make_pool({FIRST: "silent", SECOND: "up"})
    first = connect(pool)
    assert not first.called
    clock.advance(TIMEOUT)
    assert fired(first).server == SECOND
    second = connect(pool)
    assert fired(second).server == SECOND  # no clock advance needed
    assert connector.attempts == [FIRST, SECOND, SECOND]


def test_when_every_server_is_down_logins_fail_at_once():
    """With every server down, a login fails immediately with all-down and contacts no server."""
    pool, connector, clock = make_pool({FIRST: "refused", SECOND: "refused"})
    with pytest.raises(LDAPUnavailable) as first:
        fired(connect(pool))
    assert first.value.kind == "all-down"
    pool.start()
    try:
        attempts = len(connector.attempts)
        trace = Trace(clock=clock.seconds)
        with pytest.raises(LDAPUnavailable) as later:
            fired(connect(pool, trace))
        assert later.value.kind == "all-down"
        assert len(connector.attempts) == attempts
        assert [step.action for step in trace.steps] == ["skip", "skip"]
    finally:
        pool.stop()


def test_the_method_rejects_with_service_unavailable_when_every_server_is_down(tmp_path):
    """An LDAP method whose servers are all down rejects (never accepts) with service-unavailable."""
    configuration = parse_configuration(
        textwrap.dedent(
            """
            [authentications/ldap]
            type = ldap
            address = dc1.example.com
            bind_dn = ou=people,dc=example,dc=com
            """
        ),
        str(tmp_path / "x.ini"),
        str(tmp_path),
        {},
    )
    pool, connector, clock = make_pool({FIRST: "refused", SECOND: "refused"})
    method = LDAPMethod(configuration.authentications["ldap"], configuration, clock, pool=pool)
    with pytest.raises(LoginFailed) as caught:
        fired(defer.ensureDeferred(method.authenticate(LoginRequest("alice", "alice-pass", "ftp", "ftp", "192.0.2.1"))))
    assert caught.value.reason == "service-unavailable"
    assert "connection refused" in caught.value.explanation


def test_a_probe_brings_a_server_back_after_retry_interval():
    """A started pool probes a down server every retry_interval and logins use it again once a probe succeeds."""
    pool, connector, clock = make_pool({FIRST: "refused", SECOND: "up"})
    pool.start()
    try:
        fired(connect(pool))
        assert pool.states()[0].next_probe == RETRY
        clock.advance(RETRY)  # probe 1: still refused
        assert connector.attempts.count(FIRST) == 2
        assert pool.states()[0].status == DOWN
        connector.behaviour[FIRST] = "up"
        clock.advance(RETRY - 1)
        assert pool.states()[0].status == DOWN  # not before the interval
        assert fired(connect(pool)).server == SECOND
        clock.advance(1)  # probe 2 succeeds
        first = pool.states()[0]
        assert first.status == UP and first.since == 2 * RETRY and first.next_probe is None
        assert fired(connect(pool)).server == FIRST
        assert clock.getDelayedCalls() == []  # nothing scheduled while every server is up
    finally:
        pool.stop()


def test_when_every_server_is_down_probes_run_every_timeout():
    """With no server left, probes come every timeout instead of retry_interval, so logins resume soon after a server does."""
    pool, connector, clock = make_pool({FIRST: "refused", SECOND: "up"})
    pool.start()
    try:
        fired(connect(pool))
        assert [call.getTime() for call in clock.getDelayedCalls()] == [RETRY]
        connection = fired(connect(pool))
        clock.advance(1)
        connector.behaviour[SECOND] = "refused"
        connection.fail()  # the last server goes: both probes are now due within the timeout
        assert sorted(call.getTime() for call in clock.getDelayedCalls()) == [1 + TIMEOUT, 1 + TIMEOUT]
        with pytest.raises(LDAPUnavailable):
            fired(connect(pool))
        clock.advance(TIMEOUT)  # both probes fail and come back every timeout
        assert sorted(call.getTime() for call in clock.getDelayedCalls()) == [1 + 2 * TIMEOUT, 1 + 2 * TIMEOUT]
        connector.behaviour[SECOND] = "up"
        clock.advance(TIMEOUT)
        assert statuses(pool) == [DOWN, UP]
        assert fired(connect(pool)).server == SECOND
        clock.advance(TIMEOUT)  # FIRST's next probe is back to retry_interval once another is up
        first = pool.states()[0]
        assert first.next_probe - first.checked == RETRY
    finally:
        pool.stop()


def test_a_server_lost_during_an_operation_is_marked_down():
    """A connection that fails mid-operation marks its server down, so the next connection goes to the next server."""
    pool, connector, clock = make_pool({FIRST: "up", SECOND: "up"})
    connection = fired(connect(pool))
    assert connection.server == FIRST
    connection.fail()
    assert statuses(pool) == [DOWN, UNKNOWN]
    assert "connection lost during BIND" in pool.states()[0].last_error
    assert fired(connect(pool)).server == SECOND


def test_connections_lost_as_sftpauth_stops_mark_no_server_down():
    """QA: at a stop, the logins still waiting lost their connections (sftpauth closed them) and every process
    logged "LDAP server ... is down" and "every LDAP server ... is down". After stop() nothing is marked down."""
    pool, connector, clock = make_pool({FIRST: "up", SECOND: "up"})
    heard = []
    pool.state_listeners.append(lambda *change: heard.append(change))
    pool.start()
    connection = fired(connect(pool))
    heard.clear()
    pool.stop()
    with captured_logs() as events:
        connection.fail()
    assert statuses(pool) == [UP, UNKNOWN] and heard == []
    assert [formatEvent(event) for event in events if event.get("log_level") in (LogLevel.warn, LogLevel.error)] == []
    pool.start()  # a pool started again (tests, test-login) marks failures as before
    fired(connect(pool)).fail()
    assert statuses(pool)[0] == DOWN


def test_state_listeners_hear_each_change_once():
    """A server going down, staying down, coming back: the listeners hear down once and up once, with error and latency."""
    pool, connector, clock = make_pool({FIRST: "refused", SECOND: "up"})
    heard = []
    pool.state_listeners.append(lambda *change: heard.append(change))
    fired(connect(pool))
    assert heard == [
        (FIRST, DOWN, "dc1.example.com:389: connection refused", None),
        (SECOND, UP, "", pytest.approx(0.002)),
    ]
    fired(connect(pool))  # SECOND still up: nothing new
    fired(defer.ensureDeferred(pool.probe(FIRST)))  # FIRST still refused: nothing new
    assert len(heard) == 2
    connector.behaviour[FIRST] = "up"
    fired(defer.ensureDeferred(pool.probe(FIRST)))
    assert heard[2:] == [(FIRST, UP, "", pytest.approx(0.0, abs=1))]


def test_a_failing_state_listener_does_not_fail_the_login():
    pool, connector, clock = make_pool({FIRST: "refused", SECOND: "up"})
    pool.state_listeners.append(lambda *change: 1 / 0)
    assert fired(connect(pool)).server == SECOND
    assert statuses(pool) == [DOWN, UP]


def test_a_state_learnt_from_elsewhere_is_the_pools_own_and_is_not_repeated():
    """learn(): the parent takes a worker's news; a server learnt down is probed back; listeners are not told."""
    pool, connector, clock = make_pool({FIRST: "up", SECOND: "up"})
    heard = []
    pool.state_listeners.append(lambda *change: heard.append(change))
    pool.start()
    try:
        fired(defer.ensureDeferred(pool.probe(FIRST)))
        heard.clear()
        clock.advance(5)
        pool.learn(FIRST, DOWN, "dc1.example.com:389: connection lost during BIND")
        first = pool.states()[0]
        assert (first.status, first.since, first.last_error) == (DOWN, 5, "dc1.example.com:389: connection lost during BIND")
        assert first.next_probe == 5 + RETRY
        assert fired(connect(pool)).server == SECOND  # logins here skip it too
        clock.advance(RETRY)  # this pool's own probe finds it back
        assert pool.states()[0].status == UP
        pool.learn(SECOND, DOWN, "lost")
        pool.learn(SECOND, UP, latency=0.25)
        second = pool.states()[1]
        assert (second.status, second.since, second.latency, second.last_error, second.next_probe) == (UP, 5 + RETRY, 0.25, "", None)
        pool.learn(SECOND, UP)  # no latency given: the last one stays
        assert pool.states()[1].latency == 0.25
        # Only what the pool found itself (SECOND at the first login, FIRST by its probe), never what it learnt.
        assert [change[:2] for change in heard] == [(SECOND, UP), (FIRST, UP)]
    finally:
        pool.stop()


def test_stop_cancels_scheduled_and_running_probes():
    """stop() leaves no delayed call behind and a probe in flight does not change the state afterwards."""
    pool, connector, clock = make_pool({FIRST: "refused", SECOND: "up"})
    pool.start()
    fired(connect(pool))
    assert len(clock.getDelayedCalls()) == 1
    pool.stop()
    assert clock.getDelayedCalls() == []

    pool, connector, clock = make_pool({FIRST: "refused", SECOND: "up"})
    pool.start()
    fired(connect(pool))
    connector.behaviour[FIRST] = "silent"
    clock.advance(RETRY)  # the probe now waits for its timeout
    assert len(clock.getDelayedCalls()) == 1
    pool.stop()
    assert clock.getDelayedCalls() == []
    assert pool.states()[0].status == DOWN


def test_start_schedules_probes_for_servers_already_down():
    """Servers found down before start() (e.g. by a first login) get their probe when the service starts."""
    pool, connector, clock = make_pool({FIRST: "refused", SECOND: "up"})
    fired(connect(pool))
    assert clock.getDelayedCalls() == []
    pool.start()
    try:
        assert [call.getTime() for call in clock.getDelayedCalls()] == [RETRY]
    finally:
        pool.stop()


def test_a_pool_that_is_not_started_never_schedules_and_retries_after_the_interval():
    """Without probes (test-login, unit tests) nothing is scheduled and a down server is tried again after retry_interval."""
    pool, connector, clock = make_pool({FIRST: "refused", SECOND: "refused"})
    with pytest.raises(LDAPUnavailable):
        fired(connect(pool))
    assert clock.getDelayedCalls() == []
    with pytest.raises(LDAPUnavailable):
        fired(connect(pool))
    assert len(connector.attempts) == 2
    clock.advance(RETRY)
    connector.behaviour[SECOND] = "up"
    assert fired(connect(pool)).server == SECOND
    assert connector.attempts == [FIRST, SECOND, FIRST, SECOND]


def test_probe_reads_the_root_dse_and_reports_the_state():
    """probe() connects, reads the root DSE and returns the new state (used by verify tools and the dashboard)."""
    pool, connector, clock = make_pool({FIRST: "up", SECOND: "refused"})
    state = fired(defer.ensureDeferred(pool.probe(SECOND)))
    assert state.status == DOWN and state.last_error.endswith("connection refused")
    state = fired(defer.ensureDeferred(pool.probe(FIRST)))
    assert state.status == UP


def test_server_state_describes_itself_for_people_and_json():
    """A state reads as a sentence for test-login and as a dict for /health."""
    pool, connector, clock = make_pool({FIRST: "refused", SECOND: "up"}, addresses=(FIRST, SECOND, THIRD))
    pool.start()
    try:
        clock.advance(100)
        fired(connect(pool))
        clock.advance(5)
        first, second, third = pool.states()
        assert first.describe(clock.seconds()) == (
            "down for 5s; last error: dc1.example.com:389: connection refused; next probe in 25s"
        )
        assert second.describe(clock.seconds()) == "up for 5s, last connection in 2.0 ms"
        assert third.describe(clock.seconds()) == "unknown (not contacted yet)"
        assert str(third.address) == "[::1]:389"
        assert first.as_dict() == {
            "address": "dc1.example.com:389",
            "status": "down",
            "since": 100,
            "last_error": "dc1.example.com:389: connection refused",
            "latency_ms": None,
            "checked": 100,
            "next_probe": 130,
        }
    finally:
        pool.stop()


def test_the_twistd_service_starts_and_stops_the_probes():
    """The LDAPHealthProbes service starts the pools' probes with twistd and leaves nothing scheduled when stopped."""
    from sftpauth.tap import LDAPHealthProbes

    pool, connector, clock = make_pool({FIRST: "refused", SECOND: "up"})
    fired(connect(pool))
    service = LDAPHealthProbes([pool])
    service.startService()
    assert [call.getTime() for call in clock.getDelayedCalls()] == [RETRY]
    service.stopService()
    assert clock.getDelayedCalls() == []


def test_verify_ldap_needs_an_ldap_method(tmp_path, capsys):
    """verify-ldap on a file without an LDAP method, or with an unknown ID, exits 1 with a message."""
    from sftpauth.cli import main

    config = tmp_path / "x.ini"
    config.write_text("[server]\nname = test\n", encoding="utf-8")
    assert main(["verify-ldap", str(config)]) == 1
    assert "has no [authentications/ID] with type = ldap" in capsys.readouterr().err
    config.write_text(LDAP_SECTION, encoding="utf-8")
    assert main(["verify-ldap", str(config), "DEFAULT-AUTHENTICATION"]) == 1
    assert "no LDAP authentication method 'DEFAULT-AUTHENTICATION'; defined: ldap" in capsys.readouterr().err


# -- the method runs a login lost in the middle again, on each server once -------------


class LoginConnection(FakeConnection):
    """Answers a parent-strategy login for alice, or loses the connection at BIND."""

    def __init__(self, address, on_unavailable, lose: bool, password_ok: bool = True):
        super().__init__(address, on_unavailable)
        self.lose = lose
        self.password_ok = password_ok

    async def bind(self, dn, password):
        if self.lose:
            raise self.fail()
        return LDAPResult(0 if self.password_ok else 49, "")

    async def search(self, base, scope, filter_object, attributes, size_limit=0):
        return LDAPResult(0, ""), [Entry(base, {"uid": ("alice",)})]


class LoginPool:
    """Hands out scripted connections to the first server not excluded, and counts them.

    Each step of ``plan`` is one connection: "ok", "wrong-password", "lose"
    (lost at BIND), or "lose-kept" (a kept connection, lost at BIND).
    """

    def __init__(self, plan, servers: int = 2):
        self.plan = list(plan)
        self.addresses = [ServerAddress(f"dc{number}", 389) for number in range(1, servers + 1)]
        self.connections = []

    async def connect(self, trace=None, method_id="", for_searches=False, exclude=()):
        usable = [address for address in self.addresses if address not in exclude]
        if not self.plan or not usable:
            raise LDAPUnavailable("every LDAP server is down", "all-down")
        behaviour = self.plan.pop(0)
        connection = LoginConnection(
            usable[0],
            lambda address, error: None,
            lose=behaviour.startswith("lose"),
            password_ok=behaviour != "wrong-password",
        )
        connection.uses = 3 if behaviour == "lose-kept" else 0
        self.connections.append(connection)
        return connection

    def release(self, connection):
        connection.close()

    def servers(self) -> list[str]:
        return [connection.server.host for connection in self.connections]


@pytest.fixture
def ldap_configuration(tmp_path):
    return parse_configuration(
        textwrap.dedent(
            f"""
            [groups/ldap-users]
            home_folder_path = {tmp_path}/homes

            [authentications/ldap]
            type = ldap
            address = dc1, dc2
            bind_dn = ou=people,dc=example,dc=com
            username_attribute = uid
            base_groups = ldap-users
            """
        ),
        str(tmp_path / "x.ini"),
        str(tmp_path),
        {},
    )


def login(configuration, pool, trace=None):
    method = LDAPMethod(configuration.authentications["ldap"], configuration, task.Clock(), pool=pool)
    request = LoginRequest("alice", "alice-pass", "ftp", "ftp", "192.0.2.1", trace=trace or Trace())
    return fired(defer.ensureDeferred(method.authenticate(request)))


def test_a_login_lost_mid_way_is_run_again_on_the_next_server(ldap_configuration):
    """A connection lost during the BIND makes the method run the login again on the next server, which succeeds."""
    pool = LoginPool(["lose", "ok"])
    trace = Trace()
    account = login(ldap_configuration, pool, trace)
    assert account.dn == "uid=alice,ou=people,dc=example,dc=com"
    assert pool.servers() == ["dc1", "dc2"]
    assert all(connection.closed for connection in pool.connections)
    assert [step.detail for step in trace.steps if step.action == "failover"] == [
        "dc1:389: connection lost during BIND; trying the login again on the next server"]


def test_a_login_goes_on_to_every_server_until_one_answers(ldap_configuration):
    """With three servers, two lost in turn: the third serves the login (not two attempts and a failure)."""
    pool = LoginPool(["lose", "lose", "ok"], servers=3)
    assert login(ldap_configuration, pool).dn == "uid=alice,ou=people,dc=example,dc=com"
    assert pool.servers() == ["dc1", "dc2", "dc3"]


def test_a_login_fails_when_every_server_failed_it(ldap_configuration):
    """Each server is tried once: when all lost the login, it is service-unavailable, naming each failure."""
    pool = LoginPool(["lose", "lose", "ok"])
    trace = Trace()
    with pytest.raises(LoginFailed) as caught:
        login(ldap_configuration, pool, trace)
    assert caught.value.reason == "service-unavailable"
    assert [step.detail.split("; ")[1] for step in trace.steps if step.action == "failover"] == [
        "trying the login again on the next server", "no other server is left to try"]
    assert pool.servers() == ["dc1", "dc2"]
    assert "dc1:389: connection lost" in caught.value.explanation
    assert "dc2:389: connection lost" in caught.value.explanation


def test_a_kept_connection_closed_by_its_server_is_followed_by_a_new_one_to_it(ldap_configuration):
    """A kept connection lost (the server restarted, or closes idle ones) is no reason to leave that server: one
    new connection to it comes first; when that one is lost too, the next server."""
    pool = LoginPool(["lose-kept", "ok"])
    trace = Trace()
    assert login(ldap_configuration, pool, trace).dn == "uid=alice,ou=people,dc=example,dc=com"
    assert pool.servers() == ["dc1", "dc1"]
    assert [step.detail.split("; ")[1] for step in trace.steps if step.action == "failover"] == [
        "trying the login again on a new connection to the same server"]
    pool = LoginPool(["lose-kept", "lose", "ok"])
    assert login(ldap_configuration, pool).dn == "uid=alice,ou=people,dc=example,dc=com"
    assert pool.servers() == ["dc1", "dc1", "dc2"]


def test_an_ldap_answer_is_never_retried_elsewhere(ldap_configuration):
    """Invalid credentials from the directory end the login: no second server is asked."""
    pool = LoginPool(["wrong-password", "ok"])
    with pytest.raises(LoginFailed) as caught:
        login(ldap_configuration, pool)
    assert caught.value.reason != "service-unavailable"
    assert len(pool.connections) == 1


# -- TLS: host names, bundles, options -----------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return TestPKI(tmp_path_factory.mktemp("pki"))


def _certificate(pair):
    return load_certificate_bundle(str(pair.certificate))[0]


@pytest.mark.parametrize("name", ["localhost", "LOCALHOST", "127.0.0.1", "::1"])
def test_host_names_and_ip_addresses_in_the_certificate_match(pki, name):
    """DNS names (case-insensitive) and IPv4/IPv6 addresses in subjectAltName match the address used."""
    assert check_name(_certificate(pki.good), name) is None


@pytest.mark.parametrize("name", ["127.0.0.2", "::2", "ldap.example.com", "localhost.example"])
def test_other_names_do_not_match(pki, name):
    """Any other name or address is a mismatch that names what the certificate is for."""
    problem = check_name(_certificate(pki.good), name)
    assert problem == f"certificate name mismatch: it is for DNS:localhost, IP:127.0.0.1, IP:::1, not {name}"


def test_the_common_name_alone_does_not_match(pki):
    """Only subjectAltName counts (RFC 6125): the wrong-name certificate's names do not cover localhost."""
    assert "not localhost" in check_name(_certificate(pki.wrong_name), "localhost")
    assert check_name(_certificate(pki.wrong_name), "ldap.other.example") is None


def test_certificate_summary_shows_subject_issuer_expiry_and_names(pki):
    """The summary printed by verify-ldap names the subject, the issuer, the expiry and the names."""
    summary = CertificateSummary.from_certificate(_certificate(pki.expired))
    text = summary.describe()
    assert "subject CN=localhost,O=sftpauth tests" in text
    assert "issuer CN=sftpauth test CA,O=sftpauth tests" in text
    assert "expired " in text
    assert "names DNS:localhost, IP:127.0.0.1, IP:::1" in text
    assert "(in 1" in CertificateSummary.from_certificate(_certificate(pki.good)).describe()


def test_bundle_errors_are_sentences(tmp_path):
    """A missing file or a file without a PEM certificate is refused with a readable reason."""
    with pytest.raises(ValueError, match="cannot read .*No such file"):
        load_certificate_bundle(str(tmp_path / "missing.pem"))
    empty = tmp_path / "empty.pem"
    empty.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="holds no PEM certificate"):
        load_certificate_bundle(str(empty))


def test_a_ca_with_a_negative_serial_number_loads_without_a_warning(tmp_path, pki):
    """QA: check-config printed cryptography's CryptographyDeprecationWarning for Debian's own bundle
    (/etc/ssl/certs/ca-certificates.crt holds a CA whose serial number is not positive)."""
    import base64
    import warnings

    from cryptography.hazmat.primitives import serialization

    certificate = _certificate(pki.good)
    der = certificate.public_bytes(serialization.Encoding.DER)
    serial = certificate.serial_number.to_bytes((certificate.serial_number.bit_length() + 8) // 8, "big", signed=True)
    encoded = bytes([2, len(serial)]) + serial  # the DER INTEGER of the serial number
    assert der.count(encoded) == 1
    # The same length with the sign bit set: a negative serial number (the signature no longer matches,
    # which loading does not check).
    negative = der.replace(encoded, bytes([2, len(serial), 0x80]) + serial[1:], 1)
    bundle = tmp_path / "bundle.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(negative).decode() + "-----END CERTIFICATE-----\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        [loaded] = load_certificate_bundle(str(bundle))
    assert loaded.serial_number < 0
    assert [str(warning.message) for warning in caught] == []


def test_the_tls_context_requires_tls_1_2_and_verifies_peers(pki):
    """The context refuses TLS 1.0/1.1 and verifies the peer unless identity security is disabled."""
    from OpenSSL import SSL

    verifying = TLSPolicy("yes", str(pki.ca_bundle)).context()
    assert verifying.get_verify_mode() & SSL.VERIFY_PEER
    options = verifying.set_options(0)  # OpenSSL returns the options in force
    assert options & SSL.OP_NO_SSLv3 and options & SSL.OP_NO_TLSv1 and options & SSL.OP_NO_TLSv1_1
    assert TLSPolicy("starttls", DISABLED).context().get_verify_mode() == SSL.VERIFY_NONE
    assert TLSPolicy("yes", SYSTEM).describe() == "LDAPS, certificates: the system trust store"
    assert TLSPolicy("no", SYSTEM).describe() == "plain LDAP"


LDAP_SECTION = """
[authentications/ldap]
type = ldap
address = dc1.example.com, dc2.example.com:3389, [::1]:389
bind_dn = ou=people,dc=example,dc=com
"""


def parse(options: str, tmp_path, address: str = ""):
    section = LDAP_SECTION.replace("dc1.example.com, dc2.example.com:3389, [::1]:389", address) if address else LDAP_SECTION
    return parse_configuration(section + textwrap.dedent(options), str(tmp_path / "x.ini"), str(tmp_path), {})


def test_tls_and_failover_options_have_their_defaults(tmp_path):
    """Without options: plain LDAP, the system trust store, timeout 5 and retry_interval 30."""
    settings = parse("", tmp_path).authentications["ldap"]
    assert settings.address == (("dc1.example.com", None), ("dc2.example.com", 3389), ("::1", 389))
    assert (settings.secure_connection, settings.tls_trusted_certificates) == ("no", SYSTEM)
    assert (settings.timeout, settings.retry_interval) == (5, 30)
    pool = LDAPServerPool.from_settings(settings, task.Clock())
    assert [str(address) for address in pool.addresses] == ["dc1.example.com:389", "dc2.example.com:3389", "[::1]:389"]
    assert (pool.timeout, pool.retry_interval, pool.name) == (5, 30, "ldap")


def test_a_relative_bundle_path_is_read_at_load(tmp_path, pki):
    """tls_trusted_certificates = a PEM path, relative to the file, is checked and kept absolute."""
    (tmp_path / "ca.pem").write_bytes(pki.ca_bundle.read_bytes())
    settings = parse("secure_connection = starttls\ntls_trusted_certificates = ca.pem\n", tmp_path).authentications["ldap"]
    assert settings.tls_trusted_certificates == str(tmp_path / "ca.pem")
    assert settings.secure_connection == "starttls"


@pytest.mark.parametrize(
    "options, option, message",
    [
        ("secure_connection = tls\n", "secure_connection", "'tls' is not allowed; expected one of: no, yes, starttls"),
        ("tls_trusted_certificates = missing.pem\n", "tls_trusted_certificates", "cannot read"),
        ("retry_interval = 0\n", "retry_interval", "0 is out of range; allowed: 1 to 3600"),
        ("timeout = 61\n", "timeout", "61 is out of range; allowed: 1 to 60"),
    ],
)
def test_bad_tls_and_failover_options_are_errors(tmp_path, options, option, message):
    """Bad values name the option and what is allowed."""
    with pytest.raises(ConfigError) as caught:
        parse(options, tmp_path)
    [problem] = caught.value.problems
    assert problem.option == option
    assert message in problem.message


def test_disabling_identity_security_is_a_loud_warning(tmp_path):
    """disable-identity-security loads, with a warning saying the certificates are not verified."""
    configuration = parse(
        "secure_connection = yes\nport = 636\ntls_trusted_certificates = disable-identity-security\n",
        tmp_path,
        address="dc1.example.com, [::1]",
    )
    [warning] = configuration.warnings
    assert warning.option == "tls_trusted_certificates"
    assert "INSECURE" in warning.message and "NOT verified" in warning.message


def test_ldaps_on_port_389_and_unused_trust_are_warnings(tmp_path, pki):
    """LDAPS on port 389 and a trust setting with plain LDAP are probably mistakes: warnings."""
    configuration = parse("secure_connection = yes\n", tmp_path)
    [warning] = configuration.warnings
    assert warning.option == "secure_connection" and "636" in warning.message
    assert "dc1.example.com, ::1" in warning.message
    configuration = parse(f"tls_trusted_certificates = {pki.ca_bundle}\n", tmp_path)
    [warning] = configuration.warnings
    assert "ignored: secure_connection = no" in warning.message
