"""Listening sockets of the services: address and port, and what every connection passes first.

Each accepted connection goes through :class:`ConnectionGuard` before the
service's protocol (FTP, SSH, HTTPS) sees a byte of it or sends one:

1. ``maximum_concurrent_connections``: over the limit, the connection gets
   the refusal line below and is closed at once (audited as the policy's
   refusals are, reason ``maximum-concurrent-connections``);
2. ``proxy_protocol = yes``: the connection must start with an HAProxy PROXY
   header (v1 text or v2 binary, read with Twisted's parsers from
   ``twisted.protocols.haproxy``), within :data:`PROXY_HEADER_TIMEOUT`
   seconds; from then on ``getPeer()`` is the client's address the header
   gives, so bans, filters, the audit log and the protocols all see the real
   client. Anything else (no header, a malformed one) closes the
   connection. ``getHost()`` stays this server's own address: it is where
   FTP listens for passive data connections. Without the option, a
   connection starting with a PROXY header is a protocol error: it is
   closed, and the log says that the service does not expect one;
3. the service's security policy (:mod:`sftpauth.auth.policy`):
   ``source_ip_filter``, then bans, then ``maximum_connections_per_address``
   (the connection counts against its address until it closes). With Redis
   the ban check is a round trip: the connection is accepted, reading is
   paused, and the protocol starts once the policy answered (bans this node
   already knows are answered at once, without Redis). A refused connection
   gets a short, constant line (FTP ``421 Connection refused.``, SSH
   ``Connection refused.``; nothing on TLS-first services) and is closed;
   the policy audits it.

Twisted's own ``proxyEndpoint`` wrapper starts the wrapped protocol before
the header has arrived (the FTP banner goes out, and a refusal could only
come after the client's first command) and closes the connection when the
first read holds less than 16 bytes; reading the header here, before the
protocol starts, avoids both.
"""

from __future__ import annotations

import ipaddress
import resource
import socket
from typing import Any, Mapping, Optional, Union

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._info import ProxyInfo
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from sftpauth.auth.policy import RepeatThrottle, plain_address
from sftpauth.config.models import ServiceSettings

_log = Logger()

LOGIN_GRACE_SECONDS = 120  # from connect to a successful login, FTP and SSH alike (OpenSSH's LoginGraceTime)
# Connections the kernel completes and holds until the reactor accepts them. Twisted's default of 50
# is overrun by a burst of logins while the reactor is busy; Linux then drops the SYNs and the
# clients retry after 1 s (then 3, 7 s). Capped by net.core.somaxconn (4096 since Linux 5.4).
LISTEN_BACKLOG = 1024
PROXY_HEADER_TIMEOUT = 10.0  # seconds for the PROXY header to arrive
MAX_EARLY_BYTES = 65536  # bytes a client may send while the policy decides
PROBLEM_LOG_INTERVAL = 10.0  # seconds between two log lines of one kind (bad PROXY headers, the limit) of one service
SHUTDOWN_GRACE = 2.0  # seconds a connection has to close after its goodbye when its service stops; then it is cut

# What a refused connection is told: constant, whatever the reason.
REFUSAL_LINES = {
    "ftp": b"421 Connection refused.\r\n",
    "ssh": b"Connection refused.\r\n",  # RFC 4253 4.2: lines before the version string are allowed
    "sftp": b"Connection refused.\r\n",
}


class InvalidHeader(Exception):
    """The connection does not start with a valid PROXY header."""


class _V1Parser(V1Parser):
    """Twisted's v1 parser, plus what the PROXY protocol specification asks of a receiver.

    ``PROXY UNKNOWN`` with nothing after it (what HAProxy sends for a client
    on a unix socket) is accepted: the connection's own addresses stand.
    TCP4 must carry IPv4 addresses and TCP6 IPv6 ones, and ports are 0 to
    65535 in decimal; anything else is a malformed header.
    """

    @classmethod
    def parse(cls, line: bytes) -> ProxyInfo:
        if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
            return ProxyInfo(line, None, None)
        info = super().parse(line)
        if info.source is None:
            return info
        version = 4 if line.startswith(b"PROXY TCP4 ") else 6
        ports = line.split(b" ")[4:6]
        for address_, port in zip((info.source, info.destination), ports):
            family = _ip_address(address_.host).version
            if family != version:
                raise InvalidHeader(f"malformed PROXY header (an IPv{family} address in a TCP{version} header)")
            if not port.isdigit() or int(port) > 65535:
                raise InvalidHeader("malformed PROXY header (a port out of range)")
        return info


def _ip_address(host: str) -> Union[ipaddress.IPv4Address, ipaddress.IPv6Address]:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        raise InvalidHeader("the PROXY header's source is not an IP address") from None


def _canonical(address_: Any) -> Any:
    """The same address with its host as ``ipaddress`` writes it (``2001:db8::66``), whichever parser read it.

    Twisted's v2 parser writes IPv6 addresses in full (``2001:db8:0:0:0:0:0:66``);
    audit events, bans and filters must see one spelling per client.
    """
    if not isinstance(address_, (IPv4Address, IPv6Address)):
        raise InvalidHeader("the PROXY header's source is not an IP address")
    return type(address_)(address_.type, str(_ip_address(address_.host)), address_.port)


class ProxyHeaderReader:
    """Reads one PROXY header (v1 or v2) from bytes split in any way; Twisted's parsers do the parsing."""

    def __init__(self) -> None:
        self._start = b""
        self._parser: Any = None

    def feed(self, data: bytes) -> tuple[Any, bytes]:
        """(ProxyInfo, bytes after the header) once complete, (None, b"") before; raises InvalidHeader."""
        if self._parser is None:
            data = self._start + data
            self._start = b""
            signature = V2Parser.PREFIX
            if data[: len(signature)] == signature[: len(data)] and len(data) < 16:
                self._start = data  # possibly v2: wait for its 16-byte start
                return None, b""
            if data[: len(signature)] == signature:
                if data[12] & 0xF0 != 0x20:
                    raise InvalidHeader("PROXY v2 header with an unknown version")
                self._parser = V2Parser()
            elif data[:5] == V1Parser.PROXYSTR:
                self._parser = _V1Parser()
            elif V1Parser.PROXYSTR.startswith(data):
                self._start = data
                return None, b""
            else:
                raise InvalidHeader("no PROXY header")
        try:
            info, remaining = self._parser.feed(data)
        except InvalidProxyHeader as error:
            raise InvalidHeader(f"malformed PROXY header ({type(error).__name__})") from None
        except (ValueError, UnicodeDecodeError, IndexError) as error:  # Twisted's v1 parser lets some through
            raise InvalidHeader(f"malformed PROXY header ({type(error).__name__})") from None
        if info is None:
            return None, b""
        if info.source is not None:
            info = ProxyInfo(info.header, _canonical(info.source), _canonical(info.destination))
        return info, remaining or b""


class ConnectionGuard(ProtocolWrapper):
    """Stands between one TCP connection and the service's protocol until the connection is admitted."""

    HEADER, CHECKING, OPEN, REFUSED, CLOSED = "header", "checking", "open", "refused", "closed"

    def __init__(self, factory: "ConnectionGuardFactory", wrappedProtocol):
        super().__init__(factory, wrappedProtocol)
        self.state = self.CHECKING
        self.proxy_info: Any = None
        self._counted = False
        self._paused = False
        self._early: list[bytes] = []
        self._early_size = 0
        self._header: Optional[ProxyHeaderReader] = None
        self._header_timer: Any = None
        self._first_bytes = True  # a PROXY header where none is expected is refused
        self._held = ""  # the address the policy counts this connection against (maximum_connections_per_address)
        self._when_lost: Optional[defer.Deferred] = None  # close_for_shutdown waits on it

    def makeConnection(self, transport) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)  # the wrapped protocol starts once admitted

    def connectionMade(self) -> None:
        factory = self.factory
        # Replies are small writes: without TCP_NODELAY a reply may wait for the
        # client's delayed ACK (about 40 ms) of the one before it.
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)
        if factory.open_connections >= factory.limit:
            factory.refused += 1
            more = factory.log_due("limit")
            if more is not None:
                _log.warn(
                    "service {service}: refusing a connection from {peer}: maximum_concurrent_connections ({limit}) "
                    "reached{more}",
                    service=factory.service_id,
                    peer=plain_address(self.transport.getPeer().host),
                    limit=factory.limit,
                    more=f"; {more} more refused since the last line" if more else "",
                )
            self.state = self.REFUSED
            if factory.policy is not None:
                factory.policy.connection_refused(factory.service_id, self.transport.getPeer().host,
                                                  "maximum-concurrent-connections")
            if factory.refusal_line:
                self.transport.write(factory.refusal_line)
            self.transport.loseConnection()
            return
        factory.open_connections += 1
        self._counted = True
        factory.registerProtocol(self)
        if factory.proxy_protocol and not factory.settings.is_proxy_source(self.transport.getPeer().host):
            # Only the configured proxies may say who the client is (bans, source filter, audit).
            self.state = self.REFUSED
            factory.log_problem("the peer is not in proxy_protocol_sources", self.transport.getPeer())
            self.transport.abortConnection()
            return
        if factory.proxy_protocol:
            self.state = self.HEADER
            self._header = ProxyHeaderReader()
            self._header_timer = factory.reactor.callLater(PROXY_HEADER_TIMEOUT, self._header_too_slow)
            return
        self._check_policy()

    # -- PROXY header -------------------------------------------------------------------

    def _read_header(self, data: bytes) -> None:
        try:
            info, remaining = self._header.feed(data)
        except InvalidHeader as error:
            self._refuse_header(str(error))
            return
        if info is None:
            return
        self._cancel_header_timer()
        self._header = None
        self.proxy_info = info
        if remaining:
            self._keep_early(remaining)
        if self.state == self.HEADER:
            self._check_policy()

    def _header_too_slow(self) -> None:
        self._header_timer = None
        if self.state == self.HEADER:
            self._refuse_header(f"no PROXY header within {PROXY_HEADER_TIMEOUT:g}s")

    def _refuse_header(self, why: str) -> None:
        self._cancel_header_timer()
        self.state = self.REFUSED
        self.factory.log_problem(why, self.transport.getPeer())
        self.transport.abortConnection()

    def _cancel_header_timer(self) -> None:
        timer, self._header_timer = self._header_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    # -- admission ----------------------------------------------------------------------

    def _check_policy(self) -> None:
        self.state = self.CHECKING
        policy = self.factory.policy
        if policy is None:
            self._open()
            return
        try:
            decision = policy.check_connection(self.factory.service_id, self.getPeer().host)
        except Exception:
            decision = defer.fail()
        if not decision.called:  # a Redis round trip: read nothing meanwhile
            self._paused = True
            self.transport.pauseProducing()
        decision.addCallbacks(self._decided, self._check_failed)

    def _check_failed(self, failure: Failure) -> None:
        _log.failure("service {service}: the security policy check failed", failure, service=self.factory.service_id)
        self._decided(None)

    def _decided(self, refusal: Optional[str]) -> None:
        if self.state != self.CHECKING:
            return  # the client left meanwhile
        if refusal is None and self.factory.policy is not None:
            held = self.factory.policy.hold_connection(self.factory.service_id, self.getPeer().host)
            if held is None:
                refusal = "too-many-connections"
            else:
                self._held = held
        if refusal is not None:
            self.state = self.REFUSED
            if self.factory.refusal_line:
                self.transport.write(self.factory.refusal_line)
            self.transport.loseConnection()
            return
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        self._open()

    def _open(self) -> None:
        self.state = self.OPEN
        self.wrappedProtocol.makeConnection(self)
        early, self._early = self._early, []
        for data in early:
            if self.state != self.OPEN:
                break
            self.wrappedProtocol.dataReceived(data)

    def _keep_early(self, data: bytes) -> None:
        self._early_size += len(data)
        if self._early_size > MAX_EARLY_BYTES:
            self.state = self.REFUSED
            self._early = []
            self.transport.abortConnection()
            return
        self._early.append(data)

    # -- the wrapper --------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._first_bytes and not self.factory.proxy_protocol and self.state != self.HEADER:
            self._first_bytes = False
            if data.startswith((b"PROXY ", V2Parser.PREFIX)):
                self.state = self.REFUSED
                self.factory.log_problem("it starts with a PROXY header but proxy_protocol = no", self.transport.getPeer())
                self.transport.abortConnection()
                return
        if self.state == self.OPEN:
            self.wrappedProtocol.dataReceived(data)
        elif self.state == self.HEADER:
            self._read_header(data)
        elif self.state == self.CHECKING:
            self._keep_early(data)
        # REFUSED, CLOSED: dropped

    def getPeer(self):
        """The client: from the PROXY header when there is one (not LOCAL / UNKNOWN), else the TCP peer."""
        if self.proxy_info is not None and self.proxy_info.source is not None:
            return self.proxy_info.source
        return self.transport.getPeer()

    def getHost(self):
        """This server's own address, also behind a proxy (FTP listens there for passive data)."""
        return self.transport.getHost()

    def close_for_shutdown(self) -> defer.Deferred:
        """The service stops: the protocol says goodbye and closes (``shutting_down()``: FTP 421, SSH disconnect),
        or the connection is closed; cut off after :data:`SHUTDOWN_GRACE`. Fires once it is lost."""
        lost = self._when_lost = defer.Deferred()
        protocol = self.wrappedProtocol if self.state == self.OPEN else None
        while protocol is not None and not hasattr(protocol, "shutting_down"):
            protocol = getattr(protocol, "wrappedProtocol", None)  # under TLS (implicit FTPS, the Web Manager)
        if protocol is not None:
            protocol.shutting_down()
        else:
            self.transport.loseConnection()
        cut = self.factory.reactor.callLater(SHUTDOWN_GRACE, self.transport.abortConnection)
        return lost.addBoth(lambda ignored: cut.active() and cut.cancel())

    def connectionLost(self, reason) -> None:
        self._cancel_header_timer()
        opened = self.state == self.OPEN
        self.state = self.CLOSED
        self._early = []
        if self._counted:
            self._counted = False
            self.factory.open_connections -= 1
            self.factory.unregisterProtocol(self)
        if self._held:
            self.factory.policy.release_connection(self._held)
            self._held = ""
        if opened:
            self.wrappedProtocol.connectionLost(reason)
        self.wrappedProtocol = None
        lost, self._when_lost = self._when_lost, None
        if lost is not None:
            lost.callback(None)


class ConnectionGuardFactory(WrappingFactory):
    """Wraps a service's factory: connection limit, PROXY header, security policy."""

    protocol = ConnectionGuard
    noisy = False

    def __init__(self, wrapped: IProtocolFactory, settings: ServiceSettings, reactor, policy: Any = None):
        super().__init__(wrapped)
        self.reactor = reactor
        self.limit = settings.maximum_concurrent_connections
        self.service_id = settings.id
        self.settings = settings
        self.proxy_protocol = settings.proxy_protocol
        self.policy = policy  # sftpauth.auth.policy.SecurityPolicy or None
        self.refusal_line = REFUSAL_LINES.get(settings.type, b"")
        self.open_connections = 0
        self.refused = 0
        # By kind of line, "proxy" or "limit"; the last of a flood in a line of its own.
        self._log_lines = RepeatThrottle(reactor, PROBLEM_LOG_INTERVAL, summarise=self._lines_not_logged)

    def close_connections(self) -> defer.Deferred:
        """End every connection of the service (it is stopping); fires once all are closed."""
        self._log_lines.stop()
        return defer.DeferredList([guard.close_for_shutdown() for guard in list(self.protocols)])

    def _lines_not_logged(self, kind: str, repeats: int) -> None:
        """The connections a throttled line did not tell of, once its interval is over and no line followed."""
        if kind == "limit":
            what = f"refused {repeats} more since the last line: maximum_concurrent_connections ({self.limit}) reached"
        else:
            setting = "yes" if self.proxy_protocol else "no"
            what = f"closed {repeats} more since the last line for their PROXY header (proxy_protocol = {setting})"
        _log.warn("service {service}: {what}", service=self.service_id, what=what)

    def log_due(self, kind: str) -> Optional[int]:
        """Whether a line of ``kind`` may be logged now: None within PROBLEM_LOG_INTERVAL of the last one (this one
        is counted), else how many were not logged since. A scan or a flood then stays readable in the log."""
        return self._log_lines.due(kind)

    def log_problem(self, why: str, peer) -> None:
        """A missing, bad or unexpected PROXY header: logged, at most once every PROBLEM_LOG_INTERVAL seconds."""
        more = self.log_due("proxy")
        if more is None:
            return
        _log.warn(
            "service {service}: closed a connection from {peer}: {why} (proxy_protocol = {setting}){more}",
            service=self.service_id,
            peer=getattr(peer, "host", "?"),
            why=why,
            setting="yes" if self.proxy_protocol else "no",
            more=f"; {more} more since the last line" if more else "",
        )


# In a worker process (sftpauth.workers): service ID -> (file descriptor, address family) of the
# listening socket the parent bound for that service. One per process, set before the services are built.
_INHERITED_SOCKETS: dict[str, tuple[int, int]] = {}


def raise_open_file_limit(limits: Any = resource) -> tuple[int, int]:
    """Raise the process's soft limit on open files to its hard limit; (before, after).

    Every connection holds a descriptor, a transfer or an open SFTP file one
    more. A service started from a shell or by systemd gets a soft limit of
    1,024, which about 1,000 idle connections reach, and then every service
    stops accepting. The hard limit is what the administrator allows
    (systemd's ``LimitNOFILE``); nginx (``worker_rlimit_nofile``) raises it
    the same way. Twisted's default reactor (epoll) has no limit of its own.
    """
    soft, hard = limits.getrlimit(limits.RLIMIT_NOFILE)
    wanted = hard if hard != limits.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != limits.RLIM_INFINITY and soft < wanted:
        try:
            limits.setrlimit(limits.RLIMIT_NOFILE, (wanted, hard))
        except (OSError, ValueError) as error:
            _log.warn("open files: cannot raise the limit from {soft} to {wanted}: {error}", soft=soft, wanted=wanted, error=error)
            return soft, soft
        return soft, wanted
    return soft, soft


def adopt_inherited_sockets(sockets: Mapping[str, tuple[int, int]]) -> None:
    """The services named in ``sockets`` accept on those inherited listening sockets instead of listening."""
    _INHERITED_SOCKETS.clear()
    _INHERITED_SOCKETS.update(sockets)


def _is_ipv6(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).version == 6
    except ValueError:
        return False  # a host name: IPv4, as Twisted's listenTCP does


def endpoint_for(reactor, address: str, port: int):
    if _is_ipv6(address):
        return TCP6ServerEndpoint(reactor, port, backlog=LISTEN_BACKLOG, interface=address)
    return TCP4ServerEndpoint(reactor, port, backlog=LISTEN_BACKLOG, interface=address)


def bind_shared_socket(address: str, port: int, backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """A listening socket for worker processes to adopt; CannotListenError as ``listenTCP`` raises it."""
    family = socket.AF_INET6 if _is_ipv6(address) else socket.AF_INET
    shared = socket.socket(family, socket.SOCK_STREAM)
    try:
        shared.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted's ports: restarts find the port free
        shared.bind((address, port))
        shared.listen(backlog)
    except OSError as error:
        shared.close()
        raise CannotListenError(address, port, error) from None
    shared.setblocking(False)
    return shared


class ListeningService(StreamServerEndpointService):
    """A service's listening socket; when it stops, the connections it accepted are ended too.

    Otherwise they would stay open until the reactor drops them at exit,
    after the audit log is closed: their session-end events were lost, and
    clients saw a reset instead of FTP's 421 or SSH's disconnect message.
    """

    factory: ConnectionGuardFactory

    def stopService(self):
        listening = super().stopService()  # a Deferred: the port closed
        return defer.DeferredList([listening, self.factory.close_connections()])


def listening_service(
    reactor, settings: ServiceSettings, factory: IProtocolFactory, policy: Any = None
) -> ListeningService:
    """``policy``: the service's SecurityPolicy (``runtime.policy_for(settings)``); None: no filter, no bans."""
    guarded = ConnectionGuardFactory(factory, settings, reactor, policy)
    inherited = _INHERITED_SOCKETS.pop(settings.id, None)
    if inherited is not None:
        endpoint = AdoptedStreamServerEndpoint(reactor, *inherited)
    else:
        endpoint = endpoint_for(reactor, settings.address, settings.port)
    service = ListeningService(endpoint, guarded)
    service.setName(settings.id)
    # A port that cannot be bound must stop the process, not log and go on.
    service._raiseSynchronously = True
    return service
