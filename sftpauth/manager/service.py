"""``[services/ID] type = manager``: the Web Manager listening over HTTPS."""

from __future__ import annotations

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.server import Site

from sftpauth.config.models import ManagerServiceSettings
from sftpauth.listening import listening_service
from sftpauth.manager.events import AuditHistory, read_tail
from sftpauth.manager.metrics import ManagerMetrics
from sftpauth.manager.sessions import SessionStore
from sftpauth.manager.tls import load_certificate
from sftpauth.manager.web import ManagerApp, ManagerResource
from sftpauth.runtime import Runtime

_log = Logger()
SWEEP_INTERVAL = 30


class ManagerSite(Site):
    """The twisted.web site; access lines go to the twistd log (no passwords: they are never in URLs)."""

    noisy = False


class ManagerService(MultiService):
    """The HTTPS listener, the idle-session sweep, and the service states the dashboard shows."""

    def __init__(self, settings: ManagerServiceSettings, runtime: Runtime):
        super().__init__()
        self.setName(settings.id)
        self.settings = settings
        self.runtime = runtime
        self.certificate = load_certificate(settings, runtime.configuration.path, runtime.data_folder)
        self.metrics = ManagerMetrics.for_runtime(runtime)
        self.sessions = SessionStore(runtime.reactor, settings.session_idle_timeout, runtime.audit, settings.id)
        self.app = ManagerApp(
            settings,
            runtime,
            self.sessions,
            self.metrics,
            AuditHistory(runtime.audit, runtime.run_in_thread),
            service_states=self.service_states,
            certificate_fingerprint=self.certificate.fingerprint,
        )
        site = ManagerSite(ManagerResource(self.app), timeout=settings.idle_connection_timeout or None, reactor=runtime.reactor)
        site.displayTracebacks = False
        tls = TLSMemoryBIOFactory(self.certificate.options, False, site)
        listening_service(runtime.reactor, settings, tls, runtime.policy_for(settings)).setServiceParent(self)
        sweep = TimerService(SWEEP_INTERVAL, self.sessions.expire_idle)
        sweep.clock = runtime.reactor
        sweep.setServiceParent(self)

    def startService(self) -> None:
        super().startService()
        settings, certificate = self.settings, self.certificate
        _log.info(
            "Web Manager {service} on https://{address}:{port}/ ({kind} certificate {subject}, "
            "SHA-256 fingerprint {fingerprint}, valid until {until})",
            service=settings.id,
            address=settings.address if ":" not in settings.address else f"[{settings.address}]",
            port=settings.port,
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

