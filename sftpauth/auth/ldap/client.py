"""Connections to LDAP servers: failover, timeouts, health, TLS.

:class:`LDAPServerPool` is what the method uses. It tries the configured
addresses in order and keeps the health of each (:class:`ServerState`). A
network error or a ``timeout`` (connect, TLS handshake, StartTLS, each
operation) marks a server down; an LDAP answer, even a refusal, does not.
A server that is down is skipped, so only the first login that meets it
pays the ``timeout``. While the pool is started (the twistd service), a
background probe retries each down server every ``retry_interval`` seconds
and marks it up again; logins never probe. When every server is down a
login fails at once, and the probes run every ``timeout`` seconds (at most
``retry_interval``) so that the service comes back soon after a server does.

:class:`Connector` opens one connection ready for use: TCP, then LDAPS or
StartTLS as configured (see :mod:`.tls`), never falling back to plain text.
:class:`LDAPConnection` is one connected client; it is closed with UNBIND.

Connection reuse. While the pool is started (the running server) a login
gives its connection back with :meth:`LDAPServerPool.release` and the next
login on that server takes it (newest first), so a login costs no TCP
connection, TLS handshake or UNBIND. A connection never carries one user's
identity into another login, by this rule enforced in
:class:`LDAPConnection` itself: it knows the identity it is bound as (a
BIND that succeeds sets it; any other BIND answer leaves the connection
anonymous, RFC 4511 §4.2.1), and when it is lent to a new login while
bound as anybody but the method's own service account, its first
operation other than a BIND is preceded by an anonymous BIND that resets
it. Every strategy begins with a BIND, so the reset is only sent when a
login would search first (``search`` without a service account). A
connection is only lent when nothing is pending on it: after an error, a
timeout or a lost connection it is closed, never kept. Idle connections are
closed after :data:`IDLE_SECONDS`, when the server goes down, and when the
pool stops. A kept connection that turns out to have been closed by the
server meanwhile does not mark the server down: the pool drops the others
kept for that server and the login is run again on a new connection.

With ``bind_dn_type = search`` and a service account, a login of the
running server uses two kept connections: one still bound as the service
account for the searches (no BIND needed), and another for the user's
BIND. A login then costs a search and a BIND instead of two BINDs and a
search; the identity rule above is unchanged.
"""

from __future__ import annotations

import collections
import time
from typing import Callable, Collection, Optional, Sequence

import attrs
from ldaptor.protocols import pureldap
from ldaptor.protocols.ldap.ldapclient import LDAPClient
from twisted.internet import defer, error as net_error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sftpauth.auth.ldap.wire import LDAP_DECODER, MessageBuffer, NotLDAP
from sftpauth.auth.ldap.tls import CertificateSummary, TLSPolicy, TLSReport, check_name, describe_handshake_failure
from sftpauth.config.models import host_port

_log = Logger()

# LDAP result codes used by the method (RFC 4511 §4.1.9).
SUCCESS = 0
SIZE_LIMIT_EXCEEDED = 4
CONFIDENTIALITY_REQUIRED = 13
NO_SUCH_OBJECT = 32
INVALID_CREDENTIALS = 49
INSUFFICIENT_ACCESS = 50
UNWILLING_TO_PERFORM = 53

# Seconds a kept connection may stay idle before it is closed (below the
# idle time-outs directories are usually given: AD's MaxConnIdleTime is 900).
IDLE_SECONDS = 60.0

UP = "up"
DOWN = "down"
_REFERRALS_LOGGED: set = set()  # servers whose continuation references were logged (once per process)
UNKNOWN = "unknown"


@attrs.frozen
class ServerAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return host_port(self.host, self.port)


class LDAPUnavailable(Exception):
    """A server could not be used: a network error, a timeout, a TLS failure.

    ``kind`` is machine-readable (``refused``, ``timeout``, ``dns``,
    ``lost``, ``starttls-refused``, ``tls-handshake``, ``tls-expired``,
    ``tls-untrusted``, ``tls-name-mismatch``..., ``all-down``); an LDAP
    answer is never one of these.
    """

    def __init__(self, message: str, kind: str = "network", reason: str = "", server: Optional["ServerAddress"] = None):
        super().__init__(message)
        self.kind = kind
        self.reason = reason or message  # the message without the server's address
        self.server = server  # the server that failed, when one did


@attrs.frozen
class LDAPResult:
    code: int
    message: str
    matched_dn: str = ""
    referrals: tuple[str, ...] = ()  # continuation references of a search (never chased)

    @property
    def ok(self) -> bool:
        return self.code == SUCCESS


@attrs.frozen
class Entry:
    """A search result: its DN and attributes (lower-case names, text values)."""

    dn: str
    attributes: dict[str, tuple[str, ...]]

    def get(self, name: str) -> tuple[str, ...]:
        return self.attributes.get(name.lower(), ())


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _peer_text(peer) -> str:
    """``host:port`` as the other log lines name an LDAP server (not ``IPv4Address(type='TCP', ...)``)."""
    host, port = getattr(peer, "host", None), getattr(peer, "port", None)
    return str(peer) if host is None else str(ServerAddress(host, port))


@implementer(IHandshakeListener)
class _LDAPProtocol(LDAPClient):
    """ldaptor's client, told when a TLS handshake ends and when the connection goes."""

    def __init__(self):
        super().__init__()
        self._handshake: Optional[defer.Deferred] = None
        self.protocol_error = ""  # set when the server sent something that is not LDAP
        self._messages = MessageBuffer()

    def dataReceived(self, data: bytes) -> None:
        """ldaptor's LDAPClient.dataReceived loop, with garbage closing the connection at once.

        ldaptor tests ``if not message``: an LDAPMessage is a sequence whose
        length is that of its encoding, so every answer was encoded again
        just to be found non-empty (about 4% of sftpauth's CPU per FTP login).
        What is not LDAP (an HTTP answer, a TLS record, an answer announced
        over 16 MiB) fails the requests waiting on the connection now, not
        after the ``timeout``; ldaptor's ``buffer += data`` copied a big
        answer again at every read, without a limit.
        """
        self._messages.feed(data)
        while True:
            try:
                message = self._messages.next(LDAP_DECODER)
            except NotLDAP as error:
                self._not_ldap(str(error))
                return
            if message is None:
                return
            try:
                self.handle(message)
            except Exception as error:  # an answer ldaptor cannot match to a request must not become a traceback
                self._not_ldap(f"{type(error).__name__}: {error}"[:80])
                return

    def _not_ldap(self, why: str) -> None:
        self.protocol_error = why
        self._messages.clear()
        _log.warn(
            "LDAP server {peer} sent data that is not an LDAP answer ({error}); closing",
            peer=_peer_text(self.transport.getPeer()), error=why,
        )
        self.transport.abortConnection()

    def expect_handshake(self) -> defer.Deferred:
        self._handshake = defer.Deferred()
        return self._handshake

    def handshakeCompleted(self) -> None:
        waiting, self._handshake = self._handshake, None
        if waiting is not None:
            waiting.callback(None)

    def connectionLost(self, reason=net_error.ConnectionDone) -> None:
        super().connectionLost(reason)
        waiting, self._handshake = self._handshake, None
        if waiting is not None:
            waiting.errback(reason)

    def unsolicitedNotification(self, msg) -> None:
        # e.g. a Notice of Disconnection; the connection loss that follows is what counts
        _log.debug("unsolicited LDAP notification: {message!r}", message=msg)


class _OneConnection(Factory):
    """connectProtocol's factory, without a log line for every connection."""

    noisy = False

    def __init__(self, protocol: _LDAPProtocol):
        self._protocol = protocol

    def buildProtocol(self, addr) -> _LDAPProtocol:
        return self._protocol


class LDAPConnection:
    """One connected client; every operation is bounded by ``timeout``.

    A timeout or a lost connection raises :class:`LDAPUnavailable` and is
    reported to ``on_unavailable`` (the pool marks the server down).
    """

    def __init__(
        self,
        client: LDAPClient,
        server: ServerAddress,
        reactor,
        timeout: float,
        on_unavailable: Optional[Callable[[ServerAddress, "LDAPUnavailable"], None]] = None,
        tls: Optional[TLSReport] = None,
    ):
        self.client = client
        self.server = server
        self.tls = tls
        self._reactor = reactor
        self._timeout = timeout
        self._on_unavailable = on_unavailable
        self._broken = False
        self._busy = 0  # operations sent and not answered yet
        self.bound_as: Optional[str] = None  # the DN of the last successful BIND; None: anonymous
        self._reset_before_use = False  # lent while bound as somebody else: reset before any search
        self.uses = 0  # logins this connection served before the current one
        self.idle_since = 0.0

    @property
    def reusable(self) -> bool:
        """Connected, never failed, nothing pending: it may serve another login."""
        return self.client.connected and not self._broken and not self._busy

    def lend(self, shared_identity: str, on_unavailable) -> None:
        """This connection now serves a new login (:meth:`LDAPServerPool.connect`).

        Bound as anyone but ``shared_identity`` (the method's service account)
        it must not run a search as that identity: :meth:`search` first
        resets it with an anonymous BIND unless the login BINDs first.
        """
        self.uses += 1
        self._reset_before_use = self.bound_as is not None and self.bound_as != shared_identity
        self._on_unavailable = on_unavailable

    def _unavailable(self, message: str, kind: str) -> LDAPUnavailable:
        error = LDAPUnavailable(f"{self.server}: {message}", kind, message, self.server)
        if not self._broken:
            self._broken = True
            if self._on_unavailable is not None:
                self._on_unavailable(self.server, error)
        return error

    def _require_connected(self) -> None:
        if not self.client.connected:
            raise self._unavailable("connection lost", "lost")

    async def _bounded(self, deferred: defer.Deferred, what: str):
        deferred.addTimeout(self._timeout, self._reactor)
        self._busy += 1
        try:
            return await deferred
        except (defer.TimeoutError, defer.CancelledError):
            raise self._unavailable(f"no answer to {what} within {self._timeout:g}s", "timeout") from None
        except Exception as error:  # the connection went away (closed, reset, TLS error)
            if getattr(self.client, "protocol_error", ""):
                raise self._unavailable(f"the answer to {what} is not LDAP ({self.client.protocol_error})", "garbage") from None
            raise self._unavailable(f"connection lost during {what} ({_describe(error)})", "lost") from None
        finally:
            self._busy -= 1

    async def bind(self, dn: str, password: str) -> LDAPResult:
        self._require_connected()
        # From this request on the connection is anonymous until a BIND succeeds
        # (a refused BIND leaves it anonymous: RFC 4511 §4.2.1).
        self.bound_as = None
        self._reset_before_use = False
        request = pureldap.LDAPBindRequest(dn=dn, auth=password.encode("utf-8"))
        response = await self._bounded(self.client.send(request), "BIND")
        if response.resultCode == SUCCESS and dn and password:
            self.bound_as = dn  # an empty DN or password is an anonymous BIND (RFC 4513 §5.1)
        return LDAPResult(response.resultCode, _text(response.errorMessage or b""), _text(response.matchedDN or b""))

    async def search(
        self,
        base: str,
        scope: int,
        filter_object,
        attributes: Sequence[str],
        size_limit: int = 0,
    ) -> tuple[LDAPResult, list[Entry]]:
        self._require_connected()
        if self._reset_before_use:
            await self.bind("", "")  # back to anonymous: never search as the previous login's user
        entries: list[Entry] = []
        references: list[str] = []
        done: defer.Deferred = defer.Deferred()

        def handle(message) -> bool:
            if isinstance(message, pureldap.LDAPSearchResultEntry):
                attributes_found = {
                    _text(name).lower(): tuple(_text(value) for value in values)
                    for name, values in message.attributes
                }
                entries.append(Entry(_text(message.objectName), attributes_found))
                return False
            if isinstance(message, pureldap.LDAPSearchResultDone):
                if not done.called:
                    done.callback(
                        LDAPResult(message.resultCode, _text(message.errorMessage or b""), referrals=tuple(references))
                    )
                return True
            if isinstance(message, pureldap.LDAPSearchResultReference):
                # Never chased: that would send a search (anonymous, or with credentials) to another server.
                references.extend(_text(getattr(uri, "value", uri)) for uri in message.uris)
                if self.server not in _REFERRALS_LOGGED:
                    _REFERRALS_LOGGED.add(self.server)
                    _log.info(
                        "LDAP server {server} answered a search with referrals ({uris}); they are not followed",
                        server=str(self.server), uris=", ".join(references),
                    )
            return False

        def lost(failure):
            if not done.called:
                done.errback(failure)

        request = pureldap.LDAPSearchRequest(
            baseObject=base,
            scope=scope,
            derefAliases=pureldap.LDAP_DEREF_neverDerefAliases,
            sizeLimit=size_limit,
            timeLimit=int(self._timeout),
            typesOnly=0,
            filter=filter_object,
            attributes=list(attributes) or ["1.1"],
        )
        # ldaptor errbacks this Deferred (only) when the connection is lost.
        self.client.send_multiResponse(request, handle).addErrback(lost)
        result = await self._bounded(done, "search")
        return result, entries

    async def root_dse(self) -> LDAPResult:
        """Read the root DSE anonymously: any LDAP answer proves the server works."""
        result, _ = await self.search("", pureldap.LDAP_SCOPE_baseObject, pureldap.LDAPFilter_present("objectClass"), ())
        return result

    async def request_start_tls(self) -> None:
        """The StartTLS request (RFC 4511 §4.14); a refusal raises: there is no plain-text fallback.

        :meth:`handshake` must follow at once: nothing else is sent in between.
        """
        self._require_connected()
        response = await self._bounded(self.client.send(pureldap.LDAPStartTLSRequest()), "StartTLS")
        if response.resultCode != SUCCESS:
            message = _text(response.errorMessage or b"")
            raise self._unavailable(
                f"the server refused StartTLS (result code {response.resultCode}{': ' + message if message else ''})",
                "starttls-refused",
            )

    async def handshake(self, policy: TLSPolicy, report: TLSReport) -> None:
        """Start TLS on the connection now and wait for the handshake (LDAPS, or after StartTLS)."""
        self._require_connected()
        waiting = self.client.expect_handshake()
        self.client.transport.startTLS(policy.creator(self.server.host, report))
        waiting.addTimeout(self._timeout, self._reactor)
        try:
            await waiting
        except (defer.TimeoutError, defer.CancelledError):
            raise self._unavailable(f"no TLS handshake within {self._timeout:g}s", "timeout") from None
        except Exception as error:
            kind, sentence = describe_handshake_failure(report, error)
            raise self._unavailable(sentence, kind) from None
        self.tls = report
        handle = self.client.transport.getHandle()
        report.version = handle.get_protocol_version_name()
        if report.certificate is None or not report.name_checked:
            peer = handle.get_peer_certificate()
            if peer is not None:
                certificate = peer.to_cryptography()
                report.certificate = report.certificate or CertificateSummary.from_certificate(certificate)
                if not report.name_checked:
                    report.name_checked = True
                    mismatch = check_name(certificate, self.server.host)
                    if mismatch:
                        report.record("name-mismatch", mismatch)

    def abort(self) -> None:
        """Drop the connection at once (a failed or cancelled TLS set-up): no UNBIND."""
        self._broken = True
        self.close()

    def close(self) -> None:
        """UNBIND and close; safe to call twice or on a lost connection."""
        transport = self.client.transport
        if self.client.connected and not self._broken:
            try:
                self.client.unbind()
            except Exception:  # the connection went away in between
                pass
        if transport is not None:
            if self._broken:
                transport.abortConnection()
            else:
                transport.loseConnection()


@attrs.define
class ConnectProgress:
    """How far one connection attempt got (for verify-ldap and the trace)."""

    tcp_seconds: Optional[float] = None
    starttls: Optional[bool] = None  # None: not attempted
    tls: Optional[TLSReport] = None
    ready_seconds: Optional[float] = None


class Connector:
    """Opens a ready-to-use connection: TCP, then LDAPS or StartTLS as configured."""

    def __init__(self, reactor, timeout: float, tls: TLSPolicy, clock: Callable[[], float] = time.monotonic):
        self.reactor = reactor
        self.timeout = timeout
        self.tls = tls
        self._clock = clock

    async def open(
        self,
        address: ServerAddress,
        on_unavailable: Optional[Callable[[ServerAddress, LDAPUnavailable], None]] = None,
        progress: Optional[ConnectProgress] = None,
    ) -> LDAPConnection:
        progress = progress if progress is not None else ConnectProgress()
        started = self._clock()
        endpoint = _client_endpoint(self.reactor, address, self.timeout)
        attempt = endpoint.connect(_OneConnection(_LDAPProtocol()))
        attempt.addTimeout(self.timeout, self.reactor)
        try:
            client = await attempt
        except Exception as failure:  # refused, unreachable, DNS, timeout
            kind, text = _classify_connect_failure(failure, self.timeout)
            raise LDAPUnavailable(f"{address}: {text}", kind, text) from None
        progress.tcp_seconds = self._clock() - started
        connection = LDAPConnection(client, address, self.reactor, self.timeout, on_unavailable)
        if self.tls.enabled:
            report = progress.tls = self.tls.new_report(address.host)
            try:
                if self.tls.secure_connection == "starttls":
                    progress.starttls = False
                    await connection.request_start_tls()
                    progress.starttls = True
                await connection.handshake(self.tls, report)
            except BaseException:
                connection.abort()
                raise
        progress.ready_seconds = self._clock() - started
        return connection


@attrs.frozen
class ServerState:
    """One server's health, for test-login, verify-ldap, the dashboard and /health.

    Times (``since``, ``checked``, ``next_probe``) are reactor seconds (the
    epoch on a real reactor); ``latency`` is the seconds the last successful
    connection took to be ready (TCP, and TLS when configured).
    """

    address: ServerAddress
    status: str  # up, down or unknown (never contacted)
    since: Optional[float]
    last_error: str
    latency: Optional[float]
    checked: Optional[float]
    next_probe: Optional[float]

    def describe(self, now: float) -> str:
        if self.status == UNKNOWN:
            return "unknown (not contacted yet)"
        text = f"{self.status} for {_duration(now - self.since)}" if self.since is not None else self.status
        if self.latency is not None:
            text += f", last connection in {self.latency * 1000:.1f} ms"
        if self.status == DOWN:
            text += f"; last error: {self.last_error}"
            if self.next_probe is not None:
                text += f"; next probe in {_duration(max(0.0, self.next_probe - now))}"
        return text

    def as_dict(self) -> dict:
        """JSON-ready (the /health endpoint and the API)."""
        return {
            "address": str(self.address),
            "status": self.status,
            "since": self.since,
            "last_error": self.last_error,
            "latency_ms": None if self.latency is None else round(self.latency * 1000, 1),
            "checked": self.checked,
            "next_probe": self.next_probe,
        }


@attrs.define
class _Server:
    address: ServerAddress
    status: str = UNKNOWN
    since: Optional[float] = None
    last_error: str = ""
    latency: Optional[float] = None
    checked: Optional[float] = None
    probe_call: object = None  # IDelayedCall of the next probe

    def snapshot(self) -> ServerState:
        next_probe = self.probe_call.getTime() if self.probe_call is not None and self.probe_call.active() else None
        return ServerState(self.address, self.status, self.since, self.last_error, self.latency, self.checked, next_probe)


class LDAPServerPool:
    """The servers of one method: tried in order, down ones skipped, probed back."""

    def __init__(
        self,
        addresses: Sequence[ServerAddress],
        reactor,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        retry_interval: float = 30,
        tls: Optional[TLSPolicy] = None,
        name: str = "",
        connector: Optional[Connector] = None,
        keep: int = 0,
        shared_identity: str = "",
    ):
        self.addresses = tuple(addresses)
        self.name = name
        self.retry_interval = retry_interval
        # Connection reuse (see the module's docstring): at most `keep` idle
        # connections per server, lent only while the pool is started.
        self.keep = keep
        self.shared_identity = shared_identity
        self._idle: dict[ServerAddress, collections.deque] = {address: collections.deque() for address in addresses}
        self._sweep_call = None
        self._reactor = reactor
        self._clock = clock
        self.connector = connector or Connector(reactor, timeout, tls or TLSPolicy("no", "system"), clock)
        self._servers = {address: _Server(address) for address in self.addresses}
        self._probing = False
        self._stopped = False  # stop() was called: the process is ending
        self._probes_in_flight: set[defer.Deferred] = set()
        # Called with (address, status, last error, latency or None) when a server goes up or down
        # here (not for learn()): a worker tells its parent (sftpauth.workers.channel).
        self.state_listeners: list[Callable[[ServerAddress, str, str, Optional[float]], None]] = []

    @classmethod
    def from_settings(cls, settings, reactor) -> "LDAPServerPool":
        """The pool of an ``[authentications/ID] type = ldap`` section."""
        addresses = [ServerAddress(host, port or settings.port) for host, port in settings.address]
        return cls(
            addresses,
            reactor,
            settings.timeout,
            retry_interval=settings.retry_interval,
            tls=TLSPolicy(settings.secure_connection, settings.tls_trusted_certificates),
            name=settings.id,
            keep=settings.connection_pool_size,
            shared_identity=settings.service_account_dn,
        )

    @property
    def timeout(self) -> float:
        return self.connector.timeout

    # -- health ---------------------------------------------------------------

    def states(self) -> tuple[ServerState, ...]:
        return tuple(self._servers[address].snapshot() for address in self.addresses)

    def _now(self) -> float:
        return self._reactor.seconds()

    def learn(self, address: ServerAddress, status: str, error: str = "", latency: Optional[float] = None) -> None:
        """A change of state another process saw (a worker's): taken as this pool's own.

        Without the log line (that process wrote it) and without telling
        :attr:`state_listeners`. A server learnt down is probed back like one
        found down here; one learnt up keeps its last latency when none is given.
        """
        if status == UP:
            self._mark_up(address, latency, "", elsewhere=True)
        elif status == DOWN:
            self._mark_down(address, LDAPUnavailable(error), elsewhere=True)

    def _mark_up(self, address: ServerAddress, latency: Optional[float], how: str, elsewhere: bool = False) -> None:
        server = self._servers[address]
        now = self._now()
        changed = server.status != UP
        if changed:
            if server.status == DOWN and not elsewhere:
                _log.info(
                    "LDAP server {server} of {method} is up again ({how}, {latency:.1f} ms)",
                    server=str(address), method=self.name, how=how, latency=latency * 1000,
                )
            server.status, server.since = UP, now
        if latency is not None:
            server.latency = latency
        server.checked, server.last_error = now, ""
        if server.probe_call is not None and server.probe_call.active():
            server.probe_call.cancel()
        server.probe_call = None
        if changed and not elsewhere:
            self._tell(address, UP, "", latency)

    def _mark_down(self, address: ServerAddress, error: LDAPUnavailable, elsewhere: bool = False) -> None:
        if self._stopped:  # sftpauth stops: the connections it closes itself say nothing of the server
            return
        server = self._servers[address]
        now = self._now()
        changed = server.status != DOWN
        if changed:
            if not elsewhere:
                _log.warn(
                    "LDAP server {server} of {method} is down: {error}; skipped for {interval:g}s while another is up",
                    server=str(address), method=self.name, error=str(error), interval=self.retry_interval,
                )
            server.status, server.since = DOWN, now
            self._drop_idle(address)
            if self._all_down() and not elsewhere:
                _log.error(
                    "every LDAP server of {method} is down: its logins fail until a probe finds one up "
                    "(every {interval:g}s)",
                    method=self.name, interval=self._probe_delay(),
                )
        server.last_error, server.checked = str(error), now
        if changed and not elsewhere:
            self._tell(address, DOWN, str(error), None)
        self._schedule_probe(server)
        if self._all_down():
            # Nothing else can serve logins: probe the others soon too.
            for other in self._servers.values():
                call = other.probe_call
                if call is not None and call.active() and call.getTime() > now + self._probe_delay():
                    call.reset(self._probe_delay())

    def _tell(self, address: ServerAddress, status: str, error: str, latency: Optional[float]) -> None:
        for listener in self.state_listeners:
            try:
                listener(address, status, error, latency)
            except Exception:  # noqa: BLE001 - a listener's fault must not fail the login that changed the state
                _log.failure("a listener of LDAP server states of {method} failed", method=self.name)

    def _all_down(self) -> bool:
        return all(server.status == DOWN for server in self._servers.values())

    def _probe_delay(self) -> float:
        """retry_interval while another server is up; when none is, every ``timeout`` (at most retry_interval)."""
        if self._all_down():
            return min(self.retry_interval, self.timeout)
        return self.retry_interval

    def _eligible(self, server: _Server) -> bool:
        if server.status != DOWN:
            return True
        # Without probes (a pool that was never started, e.g. test-login)
        # logins retry a down server once retry_interval has passed.
        return not self._probing and self._now() - (server.checked or 0) >= self.retry_interval

    # -- logins ---------------------------------------------------------------

    @property
    def keeps_connections(self) -> bool:
        """Whether released connections are kept for the next logins (the running server)."""
        return self._probing and self.keep > 0

    async def connect(
        self, trace=None, method_id: str = "", for_searches: bool = False, exclude: Collection[ServerAddress] = ()
    ) -> LDAPConnection:
        """A connection to the first usable server; LDAPUnavailable when there is none.

        ``for_searches``: a kept connection still bound as the service account
        is preferred (its searches need no BIND); otherwise one that is not,
        so those stay available for searches. ``exclude``: servers that
        already failed this login.
        """

        def note(action: str, detail: str) -> None:
            if trace is not None:
                trace.add(method_id or self.name, action, detail)

        problems = []
        now = self._now()
        for address in self.addresses:
            server = self._servers[address]
            if address in exclude:
                continue  # its failure is already in the login's trace
            if not self._eligible(server):
                state = server.snapshot()
                note("skip", f"{address} is {state.describe(now)}")
                problems.append(f"{server.last_error} (down for {_duration(now - (server.since or now))})")
                continue
            kept = self._take_idle(address, for_searches)
            if kept is not None:
                note("connect", f"reusing a connection to {address} (login {kept.uses + 1} on it)")
                return kept
            started = self._clock()
            progress = ConnectProgress()
            try:
                connection = await self.connector.open(address, self._mark_down, progress)
            except LDAPUnavailable as error:
                self._mark_down(address, error)
                problems.append(str(error))
                note("connect", f"{error} (after {1000 * (self._clock() - started):.0f} ms)")
                continue
            self._mark_up(address, progress.ready_seconds or 0.0, "login")
            detail = f"connected to {address} in {1000 * (self._clock() - started):.0f} ms"
            if progress.tls is not None:
                kind = "StartTLS" if progress.starttls else "LDAPS"
                detail += f" ({kind}, {progress.tls.outcome()})"
            note("connect", detail)
            return connection
        raise LDAPUnavailable("; ".join(problems) or "no LDAP server is configured", "all-down")

    def release(self, connection: LDAPConnection) -> None:
        """A login is done with ``connection``: keep it for the next login, or close it."""
        idle = self._idle.get(connection.server)
        server = self._servers.get(connection.server)
        if (
            not self._probing  # not the running server (test-login), or stopped
            or idle is None
            or len(idle) >= self.keep
            or server.status == DOWN
            or not connection.reusable
        ):
            connection.close()
            return
        connection.idle_since = self._now()
        idle.append(connection)
        if self._sweep_call is None or not self._sweep_call.active():
            self._sweep_call = self._reactor.callLater(IDLE_SECONDS, self._sweep)

    def idle_connections(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    def _take_idle(self, address: ServerAddress, for_searches: bool = False) -> Optional[LDAPConnection]:
        idle = self._idle[address]
        oldest_allowed = self._now() - IDLE_SECONDS
        for connection in [c for c in idle if not c.reusable or c.idle_since < oldest_allowed]:
            idle.remove(connection)
            connection.close()
        if not idle:
            return None
        # The newest of the wanted kind (the others age out when fewer are needed), else the newest.
        service = bool(self.shared_identity)
        wanted = [c for c in idle if (service and c.bound_as == self.shared_identity) == for_searches]
        connection = wanted[-1] if wanted else idle[-1]
        idle.remove(connection)
        connection.lend(self.shared_identity, self._kept_connection_failed)
        return connection

    def _kept_connection_failed(self, address: ServerAddress, error: LDAPUnavailable) -> None:
        """A kept connection failed: the server may only have closed idle connections.

        Lost: drop the other kept connections (a restarted server closed
        them all) without marking the server down; the login is retried on
        a new connection, which tells whether the server is really down. A
        timeout or garbage is the server's fault whatever the connection.
        """
        self._drop_idle(address)
        if error.kind != "lost":
            self._mark_down(address, error)
        else:
            _log.debug("a kept connection to LDAP server {server} was closed: {error}", server=str(address), error=str(error))

    def _drop_idle(self, address: ServerAddress) -> None:
        idle = self._idle.get(address)
        while idle:
            idle.pop().close()

    def _sweep(self) -> None:
        """Close the connections idle for IDLE_SECONDS; come back while some are kept."""
        self._sweep_call = None
        oldest_allowed = self._now() - IDLE_SECONDS
        for idle in self._idle.values():
            # Oldest on the left: released first.
            while idle and (idle[0].idle_since < oldest_allowed or not idle[0].reusable):
                idle.popleft().close()
        if self.idle_connections():
            self._sweep_call = self._reactor.callLater(IDLE_SECONDS / 2, self._sweep)

    # -- probes -----------------------------------------------------------------

    def start(self) -> None:
        """Probe down servers in the background from now on (the twistd service)."""
        self._probing = True
        self._stopped = False
        for server in self._servers.values():
            if server.status == DOWN:
                self._schedule_probe(server)

    def stop(self) -> None:
        """No more probes: cancel the scheduled ones and those in flight. From now on a failure (the logins
        still in flight lose their connections as the process stops) marks no server down."""
        self._probing = False
        self._stopped = True
        for server in self._servers.values():
            if server.probe_call is not None and server.probe_call.active():
                server.probe_call.cancel()
            server.probe_call = None
        for probe in list(self._probes_in_flight):
            probe.cancel()
        if self._sweep_call is not None and self._sweep_call.active():
            self._sweep_call.cancel()
        self._sweep_call = None
        for address in self.addresses:
            self._drop_idle(address)

    def _schedule_probe(self, server: _Server) -> None:
        if not self._probing or (server.probe_call is not None and server.probe_call.active()):
            return
        server.probe_call = self._reactor.callLater(self._probe_delay(), self._start_probe, server)

    def _start_probe(self, server: _Server) -> None:
        server.probe_call = None
        probe = defer.ensureDeferred(self.probe(server.address, background=True))
        self._probes_in_flight.add(probe)

        def done(result):
            self._probes_in_flight.discard(probe)
            if isinstance(result, Failure) and not result.check(defer.CancelledError):
                _log.failure("probe of LDAP server {server} failed", result, server=str(server.address))
            return None

        probe.addBoth(done)

    async def probe(self, address: ServerAddress, background: bool = False) -> ServerState:
        """Connect (with TLS when configured) and read the root DSE; update the state.

        A background probe cancelled by :meth:`stop` leaves the state alone.
        """
        started = self._clock()
        try:
            connection = await self.connector.open(address)
            try:
                await connection.root_dse()
            finally:
                connection.close()
        except LDAPUnavailable as error:
            if self._probing or not background:
                self._mark_down(address, error)
            return self._servers[address].snapshot()
        if self._probing or not background:
            self._mark_up(address, self._clock() - started, "probe")
        return self._servers[address].snapshot()


def _client_endpoint(reactor, address: ServerAddress, timeout: float):
    """TCP to an IP address directly; a host name through HostnameEndpoint (resolved in a thread)."""
    if isIPAddress(address.host):
        return TCP4ClientEndpoint(reactor, address.host, address.port, timeout=timeout)
    if isIPv6Address(address.host):
        return TCP6ClientEndpoint(reactor, address.host, address.port, timeout=timeout)
    return HostnameEndpoint(reactor, address.host, address.port, timeout=timeout)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _classify_connect_failure(failure: Exception, timeout: float) -> tuple[str, str]:
    timed_out = (defer.TimeoutError, defer.CancelledError, net_error.TimeoutError, net_error.ConnectingCancelledError)
    if isinstance(failure, timed_out):
        return "timeout", f"connection timed out after {timeout:g}s"
    if isinstance(failure, net_error.ConnectionRefusedError):
        return "refused", "connection refused"
    if isinstance(failure, net_error.DNSLookupError):
        return "dns", "host name not found"
    return "network", _describe(failure)


def _describe(failure: Exception) -> str:
    if isinstance(failure, (defer.TimeoutError, defer.CancelledError, net_error.TimeoutError)):
        return "connection timed out"
    if isinstance(failure, net_error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(failure, net_error.DNSLookupError):
        return "host name not found"
    if isinstance(failure, (net_error.ConnectionDone, net_error.ConnectionLost)):
        return "closed by the server"
    return str(failure) or type(failure).__name__
