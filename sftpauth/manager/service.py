"""``[services/ID] type = manager``: the Web Manager listening over HTTPS."""

from __future__ import annotations

from io import BytesIO
from typing import Optional

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

from sftpauth.auth.policy import plain_address
from sftpauth.config.models import ManagerServiceSettings, host_port
from sftpauth.listening import listening_service
from sftpauth.manager.events import AuditHistory, read_tail
from sftpauth.manager.metrics import ManagerMetrics
from sftpauth.manager.sessions import SessionStore
from sftpauth.manager.tls import GENERATED_ADVICE, RESTART_ADVICE, load_certificate
from sftpauth.manager.web import MAX_BODY, SECURITY_HEADERS, ManagerApp, ManagerResource
from sftpauth.runtime import Runtime
from sftpauth.tls import DailyDateCheck, log_date_problem

_log = Logger()
SWEEP_INTERVAL = 1  # seconds: an idle Web Manager session ends (session-end) at most this late
TOO_LARGE = b"413 Content Too Large"
REQUEST_TIMEOUT = b"408 Request Timeout"
# Every answer carries the security headers (docs/manager.rst), refusals sent before any request too.
_REFUSAL_HEADERS = b"".join(b"%s: %s\r\n" % (name, value) for name, value in SECURITY_HEADERS.items())
ACCESS_FIELD_LIMIT = 200  # characters of the path, Referer and User-Agent kept in an access line


def _access_field(value: Optional[bytes]) -> str:
    """``value`` for an access line: escaped as Python escapes bytes, ``"`` too, and cut to ACCESS_FIELD_LIMIT."""
    if not value:
        return "-"
    cut = value[:ACCESS_FIELD_LIMIT]
    text = repr(cut)[2:-1].replace('"', '\\"')
    return text + ("..." if len(value) > ACCESS_FIELD_LIMIT else "")


def access_line(timestamp: str, request: Request) -> str:
    """The combined log format, each field bounded: any client can send a 16 KiB path, and that costs the log 200 characters."""
    address = request.getClientAddress()
    return '"%s" - - %s "%s %s %s" %d %s "%s" "%s"' % (
        plain_address(getattr(address, "host", "-")),
        timestamp,
        _access_field(request.method),
        _access_field(request.uri),
        _access_field(request.clientproto),
        request.code,
        request.sentLength or "-",
        _access_field(request.getHeader(b"referer")),
        _access_field(request.getHeader(b"user-agent")),
    )


class ManagerChannel(HTTPChannel):
    """twisted.web's HTTP/1.1 parser, but a request over a limit is answered at once and nothing more of it is read.

    twisted.web spools any body to a temporary file before the resource can
    see its size, and on a line over ``MAX_LENGTH`` (16 KiB) only closes,
    which over TLS waits for the idle timeout. Here a declared body over
    MAX_BODY gets 413 before a byte of it is read, a chunked one as it passes
    the limit (:class:`ManagerRequest`), an over-long line 414 or 431.

    twisted.web's ``timeOut`` (``idle_connection_timeout``) starts again with
    every read, so a client sending one byte every few seconds (slowloris)
    would hold a connection, and 20 of them a service of
    ``maximum_concurrent_connections = 20``, for ever. A request must arrive
    whole within ``request_timeout`` seconds: counted from the connection's
    start for the first (the TLS handshake is part of it), from its first
    byte for the next ones, to the end of its body. Over it: 408 and close.
    """

    request_timeout: Optional[float] = None  # ManagerSite.buildProtocol sets it
    _request_call = None
    _request_started = False  # a byte of the request now awaited has arrived

    def refuse(self, status: bytes, logged: bool = False) -> None:
        """Answer ``status`` (``TOO_LARGE``) and close; a client that keeps its side open is cut off after ``abortTimeout``."""
        self._stop_request_clock()
        if self.transport.disconnecting:
            return
        if not logged:
            peer = plain_address(getattr(self.transport.getPeer(), "host", ""))
            _log.warn("Web Manager refused a request from {peer}: {status}", peer=peer, status=status.decode("ascii"))
        self.transport.write(b"HTTP/1.1 %s\r\n%sConnection: close\r\nContent-Length: 0\r\n\r\n" % (status, _REFUSAL_HEADERS))
        self.loseConnection()
        self.setTimeout(None)
        self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)

    def connectionMade(self) -> None:
        super().connectionMade()
        self._start_request_clock()

    def _start_request_clock(self) -> None:
        if self.request_timeout and self._request_call is None:
            self._request_call = self.callLater(self.request_timeout, self._request_too_slow)

    def _stop_request_clock(self) -> None:
        call, self._request_call = self._request_call, None
        if call is not None and call.active():
            call.cancel()

    def _request_too_slow(self) -> None:
        self._request_call = None
        peer = plain_address(getattr(self.transport.getPeer(), "host", ""))
        _log.warn(
            "Web Manager closed a connection from {peer}: {what} within request_timeout ({seconds:g} s)",
            peer=peer,
            what="no whole request" if self._request_started else "not a byte of a request",
            seconds=self.request_timeout,
        )
        if self._request_started:
            self.refuse(REQUEST_TIMEOUT, logged=True)
        else:  # maybe not even through the TLS handshake: there is nobody to answer
            self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        # Over TLS, bytes go on arriving after loseConnection (until the client's close_notify):
        # read none of them, so a refused body is not parsed and does not keep the connection alive.
        if not self.transport.disconnecting:
            if data and not self._handlingRequest:
                self._request_started = True
                self._start_request_clock()  # the first byte of a request (or a pipelined one played back)
            super().dataReceived(data)

    def connectionLost(self, reason) -> None:
        self._stop_request_clock()
        super().connectionLost(reason)

    def headerReceived(self, line: bytes) -> bool:
        name, _, value = line.partition(b":")
        value = value.strip(b" \t")
        # twisted.web's int() raises, out of dataReceived, on a number of over 4,300 digits: a length
        # of more than 18 digits is never one this channel accepts, so it is refused before that.
        if name.strip().lower() == b"content-length" and value.isdigit() and len(value) > 18:
            self.refuse(TOO_LARGE)
            return False
        return super().headerReceived(line)

    def allHeadersReceived(self) -> None:
        if self.length is not None and self.length > MAX_BODY:
            self.refuse(TOO_LARGE)
        else:
            super().allHeadersReceived()

    def allContentReceived(self) -> None:
        # A chunked body refused half-way may end in the same read: its request is never handled.
        if not self.transport.disconnecting:
            self._stop_request_clock()
            self._request_started = False
            super().allContentReceived()

    def _respondToBadRequestAndDisconnect(self) -> None:
        # twisted.web's answer to a request it cannot parse (headers over 16 KiB in all, a bad request
        # line or chunk): the same refusal as the other limits, with its log line and security headers.
        self.refuse(b"400 Bad Request")

    def lineLengthExceeded(self, line: bytes) -> None:
        # No request object yet: the request line itself is too long.
        self.refuse(b"431 Request Header Fields Too Large" if self.requests else b"414 URI Too Long")


class ManagerRequest(Request):
    """A request whose body is counted as it arrives and kept in memory: it never exceeds MAX_BODY."""

    body_size = 0

    def gotLength(self, length: Optional[int]) -> None:
        # ManagerChannel has refused any longer declared length, and chunked bodies are counted below.
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        self.body_size += len(data)
        if self.body_size > MAX_BODY:
            self.channel.refuse(TOO_LARGE)
        else:
            self.content.write(data)


class ManagerSite(Site):
    """The twisted.web site; access lines (:func:`access_line`) go to the twistd log (no passwords: they are never in URLs)."""

    noisy = False
    displayTracebacks = False
    protocol = ManagerChannel
    requestFactory = ManagerRequest

    def __init__(self, resource, request_timeout: Optional[float] = None, **kwargs):
        super().__init__(resource, logFormatter=access_line, **kwargs)
        self.request_timeout = request_timeout

    @classmethod
    def for_app(cls, app: ManagerApp, settings: ManagerServiceSettings, reactor) -> "ManagerSite":
        """The site serving ``app`` with the service's connection and request timeouts."""
        return cls(
            ManagerResource(app),
            request_timeout=settings.request_timeout,
            timeout=settings.idle_connection_timeout or None,
            reactor=reactor,
        )

    def buildProtocol(self, addr):
        channel = super().buildProtocol(addr)
        channel.request_timeout = self.request_timeout
        return channel


class ManagerService(MultiService):
    """The HTTPS listener, the idle-session sweep, and the service states the dashboard shows."""

    def __init__(self, settings: ManagerServiceSettings, runtime: Runtime):
        super().__init__()
        self.setName(settings.id)
        self.settings = settings
        self.runtime = runtime
        self.certificate = load_certificate(settings, runtime.configuration.path, runtime.data_folder)
        self.metrics = ManagerMetrics.for_runtime(runtime)
        self.sessions = SessionStore(
            runtime.reactor, settings.session_idle_timeout, runtime.audit, settings.id, lifetime=settings.session_lifetime
        )
        self.app = ManagerApp(
            settings,
            runtime,
            self.sessions,
            self.metrics,
            AuditHistory(runtime.audit, runtime.run_in_thread),
            service_states=self.service_states,
            certificate_fingerprint=self.certificate.fingerprint,
        )
        site = ManagerSite.for_app(self.app, settings, runtime.reactor)
        tls = TLSMemoryBIOFactory(self.certificate.options, False, site)
        listening_service(runtime.reactor, settings, tls, runtime.policy_for(settings)).setServiceParent(self)
        sweep = TimerService(SWEEP_INTERVAL, self.sessions.expire_idle)
        sweep.clock = runtime.reactor
        sweep.setServiceParent(self)
        DailyDateCheck(runtime.reactor, self.check_certificate_dates).setServiceParent(self)

    def check_certificate_dates(self) -> str:
        certificate = self.certificate
        advice = GENERATED_ADVICE if certificate.generated else RESTART_ADVICE
        return log_date_problem(certificate.loaded, self.settings.id, advice)

    def startService(self) -> None:
        super().startService()
        settings, certificate = self.settings, self.certificate
        _log.info(
            "Web Manager {service} on https://{endpoint}/ ({kind} certificate {subject}, "
            "SHA-256 fingerprint {fingerprint}, valid until {until})",
            service=settings.id,
            endpoint=host_port(settings.address, settings.port),
            kind="generated self-signed" if certificate.generated else "configured",
            subject=certificate.subject,
            fingerprint=certificate.fingerprint,
            until=certificate.not_after.isoformat(),
        )
        if settings.header_authentication:
            _log.info(
                "Web Manager {service}: header pre-authentication from {proxies} with role {role}",
                service=settings.id,
                proxies=", ".join(str(network) for network in settings.trusted_proxies),
                role=settings.header_authentication_role,
            )
        # The dashboard and /health show every LDAP server's state from the start, not "not contacted yet".
        for method_id, pool in self.runtime.ldap_pools.items():
            for state in pool.states():
                if state.status == "unknown":
                    probe = defer.ensureDeferred(pool.probe(state.address))
                    probe.addErrback(
                        lambda failure, method=method_id: _log.failure("first probe of {method} failed", failure, method=method)
                    )
        if self.runtime.audit.path:
            # The dashboard chart survives a restart: the last hour is read back from the audit file.
            reading = self.runtime.run_in_thread(read_tail, self.runtime.audit.path, 1024 * 1024)
            reading.addCallback(self.metrics.seed)
            reading.addErrback(lambda failure: _log.failure("cannot read back the audit log", failure))

    def stopService(self):
        self.sessions.close_all("shutdown")
        self.app.stop()
        return super().stopService()

    def service_states(self) -> dict[str, str]:
        """``running`` or ``stopped`` for each service of this process."""
        top = self.parent
        states = {}
        for service_id in self.runtime.configuration.services:
            if top is None:
                continue
            try:
                child = top.getServiceNamed(service_id)
            except KeyError:
                continue
            states[service_id] = "running" if child.running else "stopped"
        return states


def make_service(settings: ManagerServiceSettings, runtime: Runtime) -> ManagerService:
    return ManagerService(settings, runtime)

