"""The parent channel: one AMP connection per worker, over a socketpair the worker inherits.

Worker -> parent: :class:`Starting` before its services listen (answered
once the parent sent any newer certificate), :class:`Ready` once they accept connections,
:class:`Audit` for every audit event (the parent is the single writer of
the audit file and feeds the Web Manager's listeners), :class:`ServerStatus`
when one of its LDAP servers goes down or up (the Web Manager's server
states are the parent's pools), and with ``state = memory`` the state
commands of :mod:`sftpauth.state` (claims, failures, resets). Parent ->
worker: :class:`~sftpauth.state.BanStarted`, and :class:`UseCertificate`
when the parent reloaded an FTPS certificate.

Besides a reloaded certificate's file (its private key included, as the
worker's standard input carries them at its start; the socketpair is the
two processes' own), nothing but audit entries, server states and state
commands crosses it: no password or code. When it closes, the worker knows
its parent is gone and stops.
"""

from __future__ import annotations

import json
from collections import Counter
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional

from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp

from sftpauth.audit import AuditLog, encode
from sftpauth.auth.ldap.client import DOWN, UP
from sftpauth.state import BanStarted, ChannelBanStore, SharedState, StateChannel, StateClient, StateServer

_log = Logger()

MAX_AUDIT_BYTES = 60_000  # an AMP value (one batch of entries) holds at most 65,535 bytes
CERTIFICATE_PART_BYTES = 60_000  # a certificate file is sent in parts of this size, for the same reason
AUDIT_BATCH_SECONDS = 0.05  # a worker sends its audit entries at most this long after recording them


class Starting(amp.Command):
    """Worker -> parent, before its services listen. The parent first sends the FTPS certificates reloaded
    since the worker's start document (:class:`UseCertificate`), then answers: messages of one connection
    are taken in order, so the worker never serves an older certificate than the parent's."""

    arguments: list = []
    response: list = []


class Ready(amp.Command):
    """Worker -> parent: its services accept connections."""

    arguments: list = []
    requiresAnswer = False


class Audit(amp.Command):
    """Worker -> parent: audit entries, each as its line of the audit file (:func:`sftpauth.audit.encode`).

    A batch: what a worker records within AUDIT_BATCH_SECONDS goes in one
    message, so a busy worker sends a few messages, not one per event. The
    parent decodes each line for its listeners and open-session counts, and
    writes the lines as they came.
    """

    arguments = [(b"entries", amp.ListOf(amp.Unicode()))]
    requiresAnswer = False


class ServerStatus(amp.Command):
    """Worker -> parent: an LDAP server of a method went down or up in the worker.

    The parent's pool of that method takes the change as its own
    (:meth:`~sftpauth.auth.ldap.client.LDAPServerPool.learn`), so the
    dashboard, ``/health`` and ``/metrics`` show what the workers found.
    """

    arguments = [
        (b"method", amp.Unicode()),
        (b"server", amp.Unicode()),  # as ServerAddress prints it: host:port
        (b"status", amp.Unicode()),  # up or down
        (b"error", amp.Unicode()),  # the last error when down
        (b"latency", amp.Float(optional=True)),  # seconds the connection took to be ready, when up
    ]
    requiresAnswer = False


class UseCertificate(amp.Command):
    """Parent -> worker: one part of the PEM file of an FTPS service's reloaded certificate; use it after the last.

    A file with a long chain can exceed an AMP value; the parts of one
    file come in order, nothing between them on this connection.
    """

    arguments = [
        (b"service", amp.Unicode()),
        (b"part", amp.String()),
        (b"last", amp.Boolean()),
    ]
    requiresAnswer = False


class _QuietAMP(amp.AMP):
    """AMP without its "connection established / lost" log lines (the pool logs what matters)."""

    def makeConnection(self, transport) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None


class ParentSide(StateServer, _QuietAMP):
    """The parent's end of one worker's channel."""

    def __init__(
        self,
        shared_state: SharedState,
        audit: AuditLog,
        on_ready: Callable[[], None],
        on_lost: Callable[[], None],
        ldap_pools: Mapping[str, Any] = MappingProxyType({}),
        on_starting: Callable[[], None] = lambda: None,
    ):
        amp.AMP.__init__(self)
        self.shared_state = shared_state
        self._audit = audit
        self._ldap_pools = ldap_pools
        self._on_starting = on_starting
        self._on_ready = on_ready
        self._on_lost = on_lost
        # The worker's sessions that started and have not ended, by what names
        # them in the audit log: ended by end_open_sessions if the worker dies.
        self.open_sessions: Counter[tuple] = Counter()

    @Starting.responder
    def _starting(self) -> dict:
        self._on_starting()
        return {}

    @Ready.responder
    def _ready(self) -> dict:
        self._on_ready()
        return {}

    @Audit.responder
    def _audit_entries(self, entries: list[str]) -> dict:
        published = []
        for line in entries:
            entry = json.loads(line)
            event = entry.get("event")
            if event == "session-start":
                self.open_sessions[_session_key(entry)] += 1
            elif event == "session-end":
                key = _session_key(entry)
                if self.open_sessions[key] <= 1:
                    del self.open_sessions[key]
                else:
                    self.open_sessions[key] -= 1
            published.append((entry, line))
        self._audit.publish_lines(published)
        return {}

    @ServerStatus.responder
    def _server_status(self, method: str, server: str, status: str, error: str, latency: Optional[float] = None) -> dict:
        pool = self._ldap_pools.get(method)
        address = next((address for address in pool.addresses if str(address) == server), None) if pool is not None else None
        if address is None or status not in (UP, DOWN):
            # Both processes read one configuration text, so this is a bug, not a worker's news.
            _log.warn("a worker reported LDAP server {server} of {method} {status}, which this process does not know",
                      server=server, method=method, status=status)
        else:
            pool.learn(address, status, error, latency)
        return {}

    def end_open_sessions(self, worker: int, how: str) -> int:
        """Write ``session-end`` (reason ``worker-exited``) for each session the worker left open; how many.

        Called once the worker's process and channel are both gone, so every
        ``session-end`` it did send has been counted.
        """
        ended = 0
        for (service, protocol, peer, username), count in sorted(self.open_sessions.items()):
            for _ in range(count):
                self._audit.record(
                    "session-end", service=service, protocol=protocol, peer=peer, username=username,
                    worker=worker, reason="worker-exited", detail=f"worker {worker} {how}",
                )
                ended += 1
        self.open_sessions.clear()
        return ended

    def announce_ban(self, scope: str, address: str, seconds: float) -> None:
        """Tell the worker of a ban (it then refuses the address without asking)."""
        if self.transport is not None:  # None once the channel is closed
            self.callRemote(BanStarted, scope=scope, address=address, seconds=float(seconds))

    def send_certificate(self, service: str, pem: bytes) -> None:
        """Give the worker the certificate file ``pem`` of FTPS service ``service``, in parts (:class:`UseCertificate`)."""
        if self.transport is None:
            return
        parts = [pem[offset : offset + CERTIFICATE_PART_BYTES] for offset in range(0, len(pem), CERTIFICATE_PART_BYTES)] or [b""]
        for number, part in enumerate(parts, start=1):
            self.callRemote(UseCertificate, service=service, part=part, last=number == len(parts))

    def connectionLost(self, reason) -> None:
        _QuietAMP.connectionLost(self, reason)
        self._on_lost()


def _session_key(entry: dict) -> tuple:
    return tuple(str(entry.get(name) or "") for name in ("service", "protocol", "peer", "username"))


class WorkerSide(StateClient, _QuietAMP):
    """A worker's end: the state stores and the audit log send through it; its loss means the parent is gone."""

    def __init__(
        self,
        channel: StateChannel,
        bans: Optional[ChannelBanStore],
        on_lost: Callable[[], None],
        on_certificate: Callable[[str, bytes], None] = lambda service, pem: None,
    ):
        amp.AMP.__init__(self)
        self._channel = channel
        self.channel_bans = bans
        self._on_lost = on_lost
        self._on_certificate = on_certificate
        self._certificate_parts: dict[str, list[bytes]] = {}

    def connectionMade(self) -> None:
        _QuietAMP.connectionMade(self)
        self._channel.protocol = self

    @UseCertificate.responder
    def _use_certificate(self, service: str, part: bytes, last: bool) -> dict:
        parts = self._certificate_parts.setdefault(service, [])
        parts.append(part)
        if last:
            del self._certificate_parts[service]
            self._on_certificate(service, b"".join(parts))
        return {}

    def report_server_state(self, method: str, address, status: str, error: str, latency: Optional[float]) -> None:
        """An LDAP pool's listener: tell the parent a server of ``method`` went ``status`` (lost when the parent is gone)."""
        if self.transport is not None:
            self.callRemote(ServerStatus, method=method, server=str(address), status=status, error=error, latency=latency)

    def connectionLost(self, reason) -> None:
        self._channel.protocol = None
        _QuietAMP.connectionLost(self, reason)
        self._on_lost()


class WorkerAuditLog(AuditLog):
    """A worker's audit log: each entry gets ``worker`` (the index) and goes to the parent, which writes it.

    Entries are sent in order, batched: at the end of the reactor turn that
    recorded them when the last message went out at least
    :data:`AUDIT_BATCH_SECONDS` ago, else that long after the last message
    (:meth:`flush`; also when the worker stops). A busy worker then sends
    one message per 50 ms instead of one per reactor turn (what the parent
    spends per message, not per entry, was most of its work), and a quiet
    one sends at once, so a worker killed while quiet loses no event.
    """

    def __init__(self, index: int, channel: StateChannel, clock):
        super().__init__("")
        self.index = index
        self._channel = channel
        self._clock = clock
        self._pending: list[str] = []
        self._flush_call = None
        self._last_sent: Optional[float] = None  # clock time of the last message to the parent

    def record(self, event: str, **fields) -> dict:
        fields["worker"] = self.index
        return super().record(event, **fields)

    def publish(self, entry: dict) -> dict:
        line = encode(entry)
        if _utf8_size(line) > MAX_AUDIT_BYTES - 2:
            # Not lost: the line reaches the parent's log through this worker's output.
            _log.warn("audit (too long to send to the parent process) {line}", line=line)
        else:
            self._pending.append(line)
            if self._flush_call is None:
                self._flush_call = self._clock.callLater(self._batch_delay(), self.flush)
        for listener in self.listeners:
            listener(entry)
        return entry

    def _batch_delay(self) -> float:
        """0 (the end of this reactor turn) when the last message is AUDIT_BATCH_SECONDS old, else the rest of that."""
        if self._last_sent is None:
            return 0.0
        since = self._clock.seconds() - self._last_sent
        return min(AUDIT_BATCH_SECONDS, max(0.0, AUDIT_BATCH_SECONDS - since))  # a clock set back waits no longer

    def flush(self) -> None:
        """Send what is pending now (also called before the channel closes)."""
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        pending, self._pending = self._pending, []
        if not pending:
            return
        protocol = self._channel.protocol
        if protocol is None:
            for line in pending:
                _log.warn("audit (not sent: the parent process is gone) {line}", line=line)
            return
        batch: list[str] = []
        size = 0
        for line in pending:
            line_size = _utf8_size(line) + 2
            if batch and size + line_size > MAX_AUDIT_BYTES:
                protocol.callRemote(Audit, entries=batch)
                batch, size = [], 0
            batch.append(line)
            size += line_size
        if batch:
            protocol.callRemote(Audit, entries=batch)
        self._last_sent = self._clock.seconds()


def _utf8_size(line: str) -> int:
    """Bytes of ``line`` in UTF-8, as AMP sends it (an ASCII line, the usual one, is not encoded to count)."""
    return len(line) if line.isascii() else len(line.encode("utf-8"))


class OneProtocolFactory(Factory):
    """Adopting a connected socket builds exactly this protocol."""

    def __init__(self, protocol: amp.AMP):
        self._protocol = protocol

    def buildProtocol(self, addr) -> amp.AMP:
        return self._protocol
