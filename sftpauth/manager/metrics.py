"""``/metrics`` in the Prometheus text format, and the dashboard's logins per minute.

One :class:`ManagerMetrics` per process (every manager service of a
runtime shares it), with its own registry. It learns what happens from
three places, none of which knows about it:

- the audit log's listeners: every ``authentication`` event (FTP, SFTP,
  Web Manager, test logins) counts as a login attempt by service, method
  and outcome; ``session-start`` / ``session-end`` give the open sessions
  per service;
- the LDAP pools' connectors, wrapped so that each connection (TCP and
  TLS), BIND and search is timed into a histogram per method and server;
- at scrape time, each pool's server states (up/down, last latency) and
  the bans in force.

Bans in force are counted from the security policy's ``ban`` and
``ban-ended`` audit events (this node's bans); a ban whose ``ban-ended``
never comes (the worker that started it died) stops counting at its
``until``. ``bans_in_force`` is the
hook to count them elsewhere instead (a callable returning how many
source addresses are banned now, e.g. from a shared Redis state).
"""

from __future__ import annotations

import collections
import datetime
import time
import weakref
from typing import Callable, Iterable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from sftpauth import __version__

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CHART_MINUTES = 60
CONTENT_TYPE = CONTENT_TYPE_LATEST

_BY_AUDIT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# No *_created series: they double the output and say nothing an administrator needs.
disable_created_metrics()


class _PoolStates:
    """Collector reading the LDAP pools' server states when Prometheus scrapes."""

    def __init__(self, pools, bans_in_force: Callable[[], Optional[int]]):
        self._pools = pools
        self._bans = bans_in_force

    def collect(self):
        up = GaugeMetricFamily(
            "sftpauth_ldap_server_up", "1 when the LDAP server answered last time, 0 when it is down", labels=["method", "server"]
        )
        latency = GaugeMetricFamily(
            "sftpauth_ldap_server_last_latency_seconds",
            "Seconds the last successful connection to the LDAP server took (TCP and TLS)",
            labels=["method", "server"],
        )
        for method_id, pool in self._pools.items():
            for state in pool.states():
                if state.status in ("up", "down"):
                    up.add_metric([method_id, str(state.address)], 1.0 if state.status == "up" else 0.0)
                if state.latency is not None:
                    latency.add_metric([method_id, str(state.address)], state.latency)
        yield up
        yield latency
        bans = GaugeMetricFamily("sftpauth_bans_in_force", "Source addresses banned by the security policy now")
        bans.add_metric([], float(self._bans() or 0))
        yield bans


def _epoch(until) -> float:
    """A ban event's ``until`` (ISO 8601, UTC) in epoch seconds; without a readable one, never."""
    try:
        return datetime.datetime.fromisoformat(str(until)).timestamp()
    except ValueError:
        return float("inf")


class ManagerMetrics:
    def __init__(self, runtime, clock: Callable[[], float] = time.monotonic):
        self.registry = CollectorRegistry(auto_describe=True)
        self._reactor = runtime.reactor
        self._clock = clock
        self.login_attempts = Counter(
            "sftpauth_login_attempts",
            "Authentication attempts by service, method and outcome (success or failure)",
            ["service", "method", "outcome"],
            registry=self.registry,
        )
        self.ldap_latency = Histogram(
            "sftpauth_ldap_operation_seconds",
            "Duration of LDAP operations: connect (TCP and TLS), bind, search",
            ["method", "server", "operation"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.open_sessions = Gauge(
            "sftpauth_open_sessions", "Sessions open now, by service (FTP, SFTP, Web Manager)", ["service"], registry=self.registry
        )
        info = Gauge("sftpauth_info", "sftpauth version", ["version"], registry=self.registry)
        info.labels(version=__version__).set(1)
        # (policy, address) banned now -> when the ban ends (epoch seconds), from the ban / ban-ended audit events
        self._bans: dict[tuple[str, str], float] = {}
        # The hook: a callable returning the bans in force (default: this node's, from the audit events).
        self.bans_in_force: Callable[[], Optional[int]] = self._bans_in_force
        self.registry.register(_PoolStates(runtime.ldap_pools, lambda: self.bans_in_force()))
        for service_id, service in runtime.configuration.services.items():
            if service.type != "ldap-directory":
                self.open_sessions.labels(service=service_id).set(0)
        self._sessions: collections.Counter = collections.Counter()
        # minute number -> [accepted, refused], for the dashboard chart
        self._minutes: dict[int, list[int]] = collections.defaultdict(lambda: [0, 0])
        runtime.audit.listeners.append(self.observe_event)
        for method_id, pool in runtime.ldap_pools.items():
            self.instrument_pool(method_id, pool)

    @classmethod
    def for_runtime(cls, runtime) -> "ManagerMetrics":
        """The one instance of this runtime (several manager services share it)."""
        metrics = _BY_AUDIT.get(runtime.audit)
        if metrics is None:
            metrics = _BY_AUDIT[runtime.audit] = cls(runtime)
        return metrics

    # -- audit events ------------------------------------------------------------

    def observe_event(self, entry: dict) -> None:
        event = entry.get("event")
        service = str(entry.get("service") or "none")
        if event == "authentication":
            if entry.get("protocol") == "test-login":
                service = "test-login"  # a Web Manager's test login, also one in manager mode
            outcome = "success" if entry.get("outcome") == "success" else "failure"
            self.login_attempts.labels(service=service, method=str(entry.get("method") or "none"), outcome=outcome).inc()
            self._count_minute(self._reactor.seconds(), outcome == "success")
        elif event == "ban":
            self._bans[(str(entry.get("policy", "")), str(entry.get("peer", "")))] = _epoch(entry.get("until"))
        elif event == "ban-ended":
            self._bans.pop((str(entry.get("policy", "")), str(entry.get("peer", ""))), None)
        elif event in ("session-start", "session-end"):
            count = self._sessions[service] + (1 if event == "session-start" else -1)
            self._sessions[service] = max(0, count)
            self.open_sessions.labels(service=service).set(self._sessions[service])

    def _bans_in_force(self) -> int:
        """This node's bans, each until its ``ban-ended`` or, if that never comes (its worker died), its ``until``."""
        now = self._reactor.seconds()
        for ban in [ban for ban, until in self._bans.items() if until <= now]:
            del self._bans[ban]
        return len(self._bans)

    def _count_minute(self, when: float, accepted: bool) -> None:
        minute = int(when // 60)
        self._minutes[minute][0 if accepted else 1] += 1
        for old in [key for key in self._minutes if key <= minute - CHART_MINUTES]:
            del self._minutes[old]

    def seed(self, entries: Iterable[dict]) -> None:
        """Count the last hour's logins read back from the audit file (after a restart)."""
        now = self._reactor.seconds()
        for entry in entries:
            if entry.get("event") != "authentication":
                continue
            try:
                when = datetime.datetime.fromisoformat(str(entry.get("time"))).timestamp()
            except ValueError:
                continue
            if now - CHART_MINUTES * 60 < when <= now:
                self._count_minute(when, entry.get("outcome") == "success")

    def logins_per_minute(self) -> list[tuple[int, int, int]]:
        """(minutes ago, accepted, refused) for the last hour, oldest first."""
        current = int(self._reactor.seconds() // 60)
        result = []
        for ago in range(CHART_MINUTES - 1, -1, -1):
            accepted, refused = self._minutes.get(current - ago, (0, 0))
            result.append((ago, accepted, refused))
        return result

    # -- LDAP latency --------------------------------------------------------------

    def instrument_pool(self, method_id: str, pool) -> None:
        """Time the pool's connections and each BIND and search made on them."""
        connector = pool.connector
        if getattr(connector, "_sftpauth_metrics", None) is not None:
            return  # already timed (one ManagerMetrics per runtime)
        connector._sftpauth_metrics = self
        open_connection = connector.open
        histogram = self.ldap_latency
        clock = self._clock

        def timed(operation: str, server: str, function):
            async def call(*args, **kwargs):
                started = clock()
                try:
                    return await function(*args, **kwargs)
                finally:
                    histogram.labels(method=method_id, server=server, operation=operation).observe(clock() - started)

            return call

        async def instrumented_open(address, *args, **kwargs):
            connection = await timed("connect", str(address), open_connection)(address, *args, **kwargs)
            connection.bind = timed("bind", str(address), connection.bind)
            connection.search = timed("search", str(address), connection.search)
            return connection

        connector.open = instrumented_open

    # -- exposition ------------------------------------------------------------------

    def render(self) -> bytes:
        return generate_latest(self.registry)
