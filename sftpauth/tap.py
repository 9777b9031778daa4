"""``twistd sftpauth --config FILE``: every enabled service of one file."""

from __future__ import annotations

import errno
import functools
import sys
from typing import Iterator, Optional

from twisted.application.service import MultiService, Service
from twisted.cred.portal import Portal
from twisted.internet.error import CannotListenError
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage

from sftpauth import __version__
from sftpauth.audit import AuditLog, cannot_open
from sftpauth.auth.chain import AuthenticationChain
from sftpauth.auth.policy import SecurityPolicies
from sftpauth.auth.methods import build_methods, ldap_pools
from sftpauth.config.errors import ConfigError, ConfigProblem
from sftpauth.config.models import Configuration, ServiceSettings, host_port
from sftpauth.listening import raise_open_file_limit
from sftpauth.realm import SessionRealm
from sftpauth.runtime import Runtime
from sftpauth.signals import ConfigurationChangeCheck, ReloadOnSIGHUP, StopCleanly, ignore_sighup_until_handled
from sftpauth.state import SharedState, build_state

_log = Logger()


class Options(usage.Options):
    synopsis = "--config FILE"
    longdesc = "Run the FTP/FTPS, SFTP and Web Manager services of an sftpauth configuration file."
    optParameters = [["config", "c", None, "the sftpauth configuration file (INI)"]]

    def postOptions(self) -> None:
        ignore_sighup_until_handled()  # the start takes a second: a SIGHUP then must not end it
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")
        _no_default_pidfile(getattr(self, "parent", None), sys.argv)
        from sftpauth.cli import load_checked_configuration

        try:
            self["configuration"] = load_checked_configuration(self["config"])
        except ConfigError as error:
            # A clear message and exit status 1, never a traceback.
            sys.stderr.write(f"sftpauth: cannot start, the configuration has errors:\n{error}\n")
            raise SystemExit(1)


def _no_default_pidfile(twistd_options, argv: list[str]) -> None:
    """In the foreground (``-n``), write no ``twistd.pid`` in the current folder unless ``--pidfile`` asks.

    twistd's default would stop a second server started from the same folder
    ("Another twistd server is running") and leave files behind; systemd,
    containers and test suites track the process themselves. A daemon keeps
    the default: it is how one stops it.
    """
    if twistd_options is None or not twistd_options.get("nodaemon"):
        return
    if any(arg == "--pidfile" or arg.startswith("--pidfile=") for arg in argv):
        return
    twistd_options["pidfile"] = ""


def build_runtime(
    configuration: Configuration, reactor, state: Optional[SharedState] = None, audit: Optional[AuditLog] = None,
    host_keys: Optional[dict] = None, tls: Optional[dict] = None,
) -> Runtime:
    """Wire the chain, the realm and the portal shared by every service.

    A worker process (sftpauth.workers) passes its own ``state`` and
    ``audit``: both reach the parent process over the parent channel; and
    the SSH ``host_keys`` and FTPS certificates (``tls``) its parent loaded.
    """
    reactor.suggestThreadPoolSize(20)
    run_in_thread = functools.partial(deferToThreadPool, reactor, reactor.getThreadPool())
    if audit is None:
        try:
            audit = AuditLog(configuration.server.audit_log)
        except OSError as error:
            raise ConfigError(
                [ConfigProblem(configuration.path, None, "server", "audit_log", cannot_open(configuration.server.audit_log, error))]
            ) from None
    if state is None:
        state = build_state(configuration.server.state, reactor)
    methods = build_methods(configuration, run_in_thread, reactor, state)
    policies = SecurityPolicies(configuration, state.bans, audit, reactor)
    chain = AuthenticationChain(configuration, methods, audit, run_in_thread, policies=policies)
    portal = Portal(SessionRealm(audit, run_in_thread), [chain])
    return Runtime(
        configuration=configuration,
        reactor=reactor,
        portal=portal,
        chain=chain,
        audit=audit,
        run_in_thread=run_in_thread,
        data_folder=configuration.server.data_folder,
        state=state,
        ldap_pools=ldap_pools(methods),
        policies=policies,
        host_keys=host_keys or {},
        tls=tls or {},
    )


class SharedStateService(Service):
    """Connects to the shared state (Redis) with the services, and closes it and the ban timers after them."""

    name = "shared-state"

    def __init__(self, runtime: Runtime):
        self._runtime = runtime

    def startService(self):
        super().startService()
        state = self._runtime.state
        _log.info("shared state (bans, used TOTP codes): {state}", state=state.description)
        if state.connection is not None:
            state.connection.start()

    def stopService(self):
        super().stopService()
        if self._runtime.policies is not None:
            self._runtime.policies.stop()
        if self._runtime.state.connection is not None:
            return self._runtime.state.connection.stop()
        return None


class LDAPHealthProbes(Service):
    """The LDAP pools probe their down servers while sftpauth runs, and stop with it."""

    name = "ldap-health-probes"

    def __init__(self, pools):
        self._pools = tuple(pools)

    def startService(self):
        super().startService()
        for pool in self._pools:
            _log.info(
                "LDAP method {method}: servers {servers} ({security}), timeout {timeout}s, retry_interval {retry}s",
                method=pool.name,
                servers=", ".join(str(address) for address in pool.addresses),
                security=pool.connector.tls.describe(),
                timeout=pool.timeout,
                retry=pool.retry_interval,
            )
            pool.start()

    def stopService(self):
        super().stopService()
        for pool in self._pools:
            pool.stop()


# With [server] workers > 1 these run in the worker processes, on sockets the parent bound;
# the others (the Web Manager, the embedded directory) run once, in the parent.
WORKER_SERVICE_TYPES = frozenset({"ftp", "ftpsi", "ssh", "sftp"})


def service_factories():
    from sftpauth import directory, ftp, ssh
    from sftpauth.manager import service as manager

    return {
        "ftp": ftp.make_service,
        "ftpsi": ftp.make_service,
        "ssh": ssh.make_service,
        "sftp": ssh.make_service,
        "manager": manager.make_service,
        "ldap-directory": directory.make_service,
    }


def makeService(options: Options, reactor=None) -> MultiService:
    try:
        return _make_service(options, reactor)
    except ConfigError as error:
        # Problems found while building services (host keys, LDIF, audit log)
        # get the same treatment as bad options: a message and exit status 1,
        # with the line of the option in the file.
        located = ConfigError(options["configuration"].locate(error.problems))
        sys.stderr.write(f"sftpauth: cannot start:\n{located}\n")
        raise SystemExit(1)


_LISTEN_HINTS = {
    errno.EADDRINUSE: "another program, or another sftpauth, already listens there",
    errno.EACCES: "ports below 1024 need root or the CAP_NET_BIND_SERVICE capability",
    errno.EADDRNOTAVAIL: "no network interface of this machine has that address",
}


def cannot_listen_problem(configuration: Configuration, error: CannotListenError) -> ConfigProblem:
    """What a port that cannot be opened says: the service's ``port`` option, with its line."""
    cause = error.socketError
    reason = getattr(cause, "strerror", None) or str(cause)
    hint = _LISTEN_HINTS.get(getattr(cause, "errno", None))
    message = f"cannot listen on {host_port(error.interface or '*', error.port)}: {reason}" + (f" ({hint})" if hint else "")
    section = None
    for settings in configuration.services.values():
        if settings.enabled and (settings.address, settings.port) == (error.interface, error.port):
            section = f"services/{settings.id}"
            break
    problem = ConfigProblem(configuration.path, None, section, "port" if section else None, message)
    return configuration.locate([problem])[0]


class ServerServices(MultiService):
    """The process's top service: a port that cannot be opened stops sftpauth with a one-line error.

    The error names the file, the line, the service's section and its
    ``port`` option (as a bad option does), instead of twistd's traceback.
    Every listening socket (FTP, SFTP, Web Manager, the demo directory, and
    with workers the parent's shared sockets) is opened in
    ``privilegedStartService``.
    """

    def __init__(self, runtime: Runtime):
        super().__init__()
        self.runtime = runtime

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as error:
            problem = cannot_listen_problem(self.runtime.configuration, error)
            _log.critical("sftpauth: cannot start: {problem}", problem=str(problem))
            raise SystemExit(1) from None

    def stopService(self):
        """Stop every service, then close the audit log: not before, since stopping writes events.

        twisted's MultiService stops its children all at once; the worker
        pool's stop ends when its workers have exited, and the parent then
        writes the session-end events of the sessions they left open. The
        FTP and SFTP services end their sessions as they stop
        (:class:`sftpauth.listening.ListeningService`), ``reason = shutdown``.
        """
        self.runtime.portal.realm.shutting_down()
        stopped = super().stopService()

        def close(result):
            self.runtime.chain.abandon_logins()  # a login still waiting on its LDAP server gets its event now
            self.runtime.audit.close()
            return result

        return stopped.addBoth(close)


def _make_service(options: Options, reactor=None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor
    configuration: Configuration = options["configuration"]
    for warning in configuration.warnings:
        _log.warn("configuration: {warning}", warning=str(warning))
    nobody = configuration.serves_nobody()
    if nobody:
        _log.warn("configuration: {warning}", warning=nobody)
    before, after = raise_open_file_limit()
    _log.info("open files: at most {after}" + (" (raised from {before})" if after != before else ""), before=before, after=after)
    runtime = build_runtime(configuration, reactor)
    top = ServerServices(runtime)
    # The first SIGHUP handler, so the process never dies of a SIGHUP (its default action); the FTPS
    # certificate reloads, and with workers the parent's passing it on, are chained after it.
    change = ConfigurationChangeCheck(reactor, configuration.path)

    def reload() -> None:
        runtime.audit.reopen()
        change.check()

    ReloadOnSIGHUP(reactor, reload).setServiceParent(top)
    StopCleanly(reactor).setServiceParent(top)
    add_runtime_services(runtime, top)
    pool = None
    if configuration.server.workers > 1:
        from sftpauth.workers.pool import WorkerPool

        pool = WorkerPool(runtime)
    factories = service_factories()
    for settings in enabled_services(configuration):
        if pool is not None and settings.type in WORKER_SERVICE_TYPES:
            pool.add_service(settings).setServiceParent(top)
        else:
            factories[settings.type](settings, runtime).setServiceParent(top)
    if pool is not None:
        pool.setServiceParent(top)  # the audit log is closed once it has stopped (ServerServices.stopService)
    _log.info("sftpauth {version} configured from {path}", version=__version__, path=configuration.path)
    return top


def add_runtime_services(runtime: Runtime, top: MultiService) -> None:
    """What every process serving logins runs beside its services: the shared state, the LDAP probes."""
    SharedStateService(runtime).setServiceParent(top)
    LDAPHealthProbes(runtime.ldap_pools.values()).setServiceParent(top)


def enabled_services(configuration: Configuration) -> Iterator[ServiceSettings]:
    for service_id, settings in configuration.services.items():
        if settings.enabled:
            yield settings
        else:
            _log.info("service {service} is disabled", service=service_id)
