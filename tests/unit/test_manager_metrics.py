"""/metrics and the dashboard chart: counted from audit events, LDAP latency and server states."""

from __future__ import annotations

import datetime
import textwrap

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from sftpauth.audit import AuditLog
from sftpauth.auth.ldap.client import DOWN, UP, ServerAddress, ServerState
from sftpauth.config.loader import parse_configuration
from sftpauth.manager.metrics import ManagerMetrics
from sftpauth.manager.views import build_chart


class FakeConnection:
    async def bind(self, dn, password):
        return "bound"

    async def search(self, *args, **kwargs):
        return "found"


class FakeConnector:
    def __init__(self):
        self.opened = []

    async def open(self, address, on_unavailable=None, progress=None):
        self.opened.append(address)
        return FakeConnection()


class FakePool:
    def __init__(self, states):
        self.connector = FakeConnector()
        self._states = states

    def states(self):
        return self._states


class FakeRuntime:
    def __init__(self, pools=None):
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1_800_000_000)
        self.audit = AuditLog()
        self.ldap_pools = pools or {}
        self.configuration = parse_configuration(
            textwrap.dedent(
                """
                [services/ftp]
                type = ftp
                port = 2121
                [services/web]
                type = manager
                port = 8443
                """
            ),
            "/x.ini",
            "/",
            {},
        )


def sample(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_start} not in\n{text}")


def test_login_attempts_by_service_method_and_outcome():
    """Every authentication audit event counts once, labelled by service, method and outcome."""
    runtime = FakeRuntime()
    metrics = ManagerMetrics(runtime)
    runtime.audit.record("authentication", service="ftp", method="ldap", outcome="success")
    runtime.audit.record("authentication", service="ftp", method="ldap", outcome="failure", reason="invalid-password")
    runtime.audit.record("authentication", service="ftp", method="ldap", outcome="failure", reason="invalid-password")
    runtime.audit.record("authentication", service="web", method="", outcome="failure", reason="empty-password")
    text = metrics.render().decode()
    assert sample(text, 'sftpauth_login_attempts_total{method="ldap",outcome="success",service="ftp"}') == 1
    assert sample(text, 'sftpauth_login_attempts_total{method="ldap",outcome="failure",service="ftp"}') == 2
    assert sample(text, 'sftpauth_login_attempts_total{method="none",outcome="failure",service="web"}') == 1
    assert "_created" not in text


def test_test_logins_count_under_test_login_also_in_manager_mode():
    """A Web Manager test login is audited under the manager's service in manager mode; it counts as test-login."""
    runtime = FakeRuntime()
    metrics = ManagerMetrics(runtime)
    runtime.audit.record("authentication", service="web", protocol="test-login", method="ldap", outcome="success")
    runtime.audit.record("authentication", service="test-login", protocol="test-login", method="ldap", outcome="failure")
    runtime.audit.record("authentication", service="web", protocol="manager", method="ldap", outcome="success")
    text = metrics.render().decode()
    assert sample(text, 'sftpauth_login_attempts_total{method="ldap",outcome="success",service="test-login"}') == 1
    assert sample(text, 'sftpauth_login_attempts_total{method="ldap",outcome="failure",service="test-login"}') == 1
    assert sample(text, 'sftpauth_login_attempts_total{method="ldap",outcome="success",service="web"}') == 1


def test_open_sessions_follow_session_events():
    """session-start and session-end move the open-sessions gauge of their service, never below 0."""
    runtime = FakeRuntime()
    metrics = ManagerMetrics(runtime)
    for _ in range(3):
        runtime.audit.record("session-start", service="ftp")
    runtime.audit.record("session-end", service="ftp")
    runtime.audit.record("session-end", service="web")
    text = metrics.render().decode()
    assert sample(text, 'sftpauth_open_sessions{service="ftp"}') == 2
    assert sample(text, 'sftpauth_open_sessions{service="web"}') == 0


def test_logins_per_minute_covers_the_last_hour():
    """The chart series has 60 minutes, oldest first; older logins drop out as the clock moves."""
    runtime = FakeRuntime()
    metrics = ManagerMetrics(runtime)
    runtime.audit.record("authentication", service="ftp", outcome="success")
    runtime.reactor.advance(60 * 5)
    runtime.audit.record("authentication", service="ftp", outcome="failure")
    runtime.audit.record("authentication", service="ftp", outcome="success")
    series = metrics.logins_per_minute()
    assert len(series) == 60
    assert series[-1] == (0, 1, 1)
    assert series[-6] == (5, 1, 0)
    runtime.reactor.advance(60 * 56)
    assert sum(accepted for _, accepted, _ in metrics.logins_per_minute()) == 1
    runtime.reactor.advance(60 * 5)
    assert metrics.logins_per_minute() == [(ago, 0, 0) for ago in range(59, -1, -1)]


def test_seed_reads_back_the_last_hour():
    """After a restart the chart is filled from the audit file's recent authentication events."""
    runtime = FakeRuntime()
    metrics = ManagerMetrics(runtime)
    now = datetime.datetime.fromtimestamp(runtime.reactor.seconds(), datetime.timezone.utc)
    metrics.seed(
        [
            {"event": "authentication", "outcome": "success", "time": (now - datetime.timedelta(minutes=2)).isoformat()},
            {"event": "authentication", "outcome": "failure", "time": (now - datetime.timedelta(minutes=90)).isoformat()},
            {"event": "session-start", "time": now.isoformat()},
            {"event": "authentication", "outcome": "failure", "time": "garbage"},
        ]
    )
    series = metrics.logins_per_minute()
    assert sum(item[1] for item in series) == 1 and sum(item[2] for item in series) == 0


def test_ldap_operations_are_timed_per_server():
    """Connections, BINDs and searches through a pool's connector land in the latency histogram."""
    pool = FakePool([])
    runtime = FakeRuntime({"ldap": pool})
    metrics = ManagerMetrics(runtime)
    address = ServerAddress("127.0.0.1", 389)

    async def login():
        connection = await pool.connector.open(address, None, None)
        assert await connection.bind("cn=x", "pw") == "bound"
        assert await connection.search("dc=x", 2, None, ()) == "found"

    result = []
    defer.ensureDeferred(login()).addBoth(result.append)
    assert result == [None]
    text = metrics.render().decode()
    for operation in ("connect", "bind", "search"):
        assert sample(text, f'sftpauth_ldap_operation_seconds_count{{method="ldap",operation="{operation}",server="127.0.0.1:389"}}') == 1
    ManagerMetrics(runtime)  # a second instance must not time twice
    assert getattr(pool.connector, "_sftpauth_metrics") is metrics


def test_ldap_server_states_and_bans_hook():
    """Up/down and last latency per server come from the pool at scrape time; bans from the hook."""
    states = [
        ServerState(ServerAddress("ldap1", 389), UP, 1.0, "", 0.012, 1.0, None),
        ServerState(ServerAddress("ldap2", 389), DOWN, 1.0, "connection refused", None, 1.0, 31.0),
        ServerState(ServerAddress("ldap3", 389), "unknown", None, "", None, None, None),
    ]
    runtime = FakeRuntime({"ldap": FakePool(states)})
    metrics = ManagerMetrics(runtime)
    metrics.bans_in_force = lambda: 3
    text = metrics.render().decode()
    assert sample(text, 'sftpauth_ldap_server_up{method="ldap",server="ldap1:389"}') == 1
    assert sample(text, 'sftpauth_ldap_server_up{method="ldap",server="ldap2:389"}') == 0
    assert 'server="ldap3:389"' not in text
    assert sample(text, 'sftpauth_ldap_server_last_latency_seconds{method="ldap",server="ldap1:389"}') == pytest.approx(0.012)
    assert sample(text, "sftpauth_bans_in_force") == 3


def test_one_metrics_object_per_runtime():
    """Several manager services of one process share one ManagerMetrics."""
    runtime = FakeRuntime()
    assert ManagerMetrics.for_runtime(runtime) is ManagerMetrics.for_runtime(runtime)
    assert len(runtime.audit.listeners) == 1


def test_chart_geometry():
    """Bars stack refused on accepted, scaled to a round maximum, with a title per minute."""
    series = [(ago, 0, 0) for ago in range(59, 0, -1)] + [(0, 3, 1)]
    chart = build_chart(series)
    assert len(chart["bars"]) == 60
    last = chart["bars"][-1]
    assert last["title"] == "now: 3 accepted, 1 refused"
    assert last["accepted_height"] == pytest.approx(3 * last["refused_height"], abs=0.2)
    assert last["refused_y"] + last["refused_height"] == pytest.approx(last["accepted_y"], abs=0.2)
    assert [line["label"] for line in chart["grid"]] == ["0", "2", "4"]
    assert [tick["label"] for tick in chart["ticks"]] == ["-60 min", "-45 min", "-30 min", "-15 min", "now"]


def test_bans_in_force_follow_ban_events():
    """The security policy's ban and ban-ended audit events give the bans-in-force gauge."""
    runtime = FakeRuntime()
    metrics = ManagerMetrics(runtime)
    runtime.audit.record("ban", policy="DEFAULT-SECURITY-POLICY", peer="192.0.2.1", service="ftp")
    runtime.audit.record("ban", policy="DEFAULT-SECURITY-POLICY", peer="192.0.2.2", service="ftp")
    runtime.audit.record("ban", policy="DEFAULT-SECURITY-POLICY", peer="192.0.2.2", service="ssh")
    assert sample(metrics.render().decode(), "sftpauth_bans_in_force") == 2
    runtime.audit.record("ban-ended", policy="DEFAULT-SECURITY-POLICY", peer="192.0.2.1")
    assert sample(metrics.render().decode(), "sftpauth_bans_in_force") == 1


def test_a_ban_whose_end_never_comes_stops_counting_at_its_until():
    """A worker that started a ban and died never writes its ban-ended: the ban counts until its ``until`` only."""
    runtime = FakeRuntime()
    metrics = ManagerMetrics(runtime)
    now = runtime.reactor.seconds()

    def until(seconds: float) -> str:
        return datetime.datetime.fromtimestamp(now + seconds, datetime.timezone.utc).isoformat(timespec="seconds")

    runtime.audit.record("ban", policy="P", peer="192.0.2.1", service="ftp", until=until(15), worker=2)
    runtime.audit.record("ban", policy="P", peer="192.0.2.2", service="ftp", until=until(3600), worker=1)
    assert sample(metrics.render().decode(), "sftpauth_bans_in_force") == 2
    runtime.reactor.advance(16)
    assert sample(metrics.render().decode(), "sftpauth_bans_in_force") == 1
    runtime.audit.record("ban-ended", policy="P", peer="192.0.2.2")
    assert sample(metrics.render().decode(), "sftpauth_bans_in_force") == 0
