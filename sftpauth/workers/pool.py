"""The parent's side of ``[server] workers = N``: shared sockets, and N worker processes kept running.

Start: each FTP/FTPS/SFTP service's socket is bound in
``privilegedStartService`` (errors as without workers, before any worker
exists), then the workers are spawned with ``reactor.spawnProcess``. Each
gets on its standard input the configuration text, the SSH host keys and
the FTPS certificates the parent loaded (:func:`start_document`: every
worker, also a restarted one, runs the file as it was when sftpauth
started, with the same host keys and the certificate in use, whatever the
files hold by then), its channel on fd 3 and the listening sockets from fd
4 on.

While running: a worker's output lines go to the parent's log as
``worker N: ...``; a worker that exits is started again, at once after a
long run, with a growing delay (up to :data:`MAX_RESTART_DELAY`) when it
keeps exiting quickly. The parent holds the FTPS certificates: it reloads
them on SIGHUP, checks their dates daily, and gives each ready worker the
one in use when it differs from what that worker has
(:meth:`WorkerPool.send_certificates`); workers ignore SIGHUP.

Stop: SIGTERM to every worker, then wait until each has exited and its
channel is drained (its last audit events written); a worker still there
after :data:`STOP_TIMEOUT` seconds is killed.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import sys
from typing import Optional

from twisted.application.service import MultiService, Service
from twisted.internet import defer, error as internet_error
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

import sftpauth
from sftpauth import ftp, ssh
from sftpauth.config.checks import allowed_cpus
from sftpauth.config.models import ServiceSettings
from sftpauth.listening import bind_shared_socket
from sftpauth.runtime import Runtime
from sftpauth.state import MemoryBanStore
from sftpauth.signals import ReloadOnSIGHUP
from sftpauth.tls import DailyDateCheck, ServerTLS, parse_server_certificate
from sftpauth.workers import CHANNEL_FD, FIRST_SOCKET_FD
from sftpauth.workers.channel import OneProtocolFactory, ParentSide

_log = Logger()

STOP_TIMEOUT = 10.0  # seconds a worker has to exit after SIGTERM before it is killed
FIRST_RESTART_DELAY = 0.5  # seconds before a worker that exited is started again ...
MAX_RESTART_DELAY = 30.0  # ... doubling while it keeps exiting quickly, up to this
STABLE_AFTER = 60.0  # a worker that ran this long is restarted without delay growth
MAX_LINE = 16 * 1024  # a worker's output line longer than this is cut
_LEVELS = {level.name: level for level in LogLevel.iterconstants()}


class SharedListeningSocket(Service):
    """One FTP/FTPS/SFTP service's listening socket, bound by the parent; every worker accepts on it.

    Named like the service, so the Web Manager's dashboard shows the
    service as running while its socket is open.
    """

    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self.setName(settings.id)
        self.socket: Optional[socket.socket] = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.socket is None:
            self.socket = bind_shared_socket(self.settings.address, self.settings.port)

    def stopService(self):
        super().stopService()
        shared, self.socket = self.socket, None
        if shared is not None:
            shared.close()


class WorkerProcess(ProcessProtocol):
    """One worker process and its channel; ``ended`` fires when both are gone."""

    def __init__(self, pool: "WorkerPool", index: int):
        self.pool = pool
        self.index = index
        self.pid: Optional[int] = None
        self.started_at = pool.reactor.seconds()
        self.ready = False
        self.ended: defer.Deferred = defer.Deferred()
        self.channel: Optional[ParentSide] = None
        self._partial = {1: b"", 2: b""}
        self._process_over = False
        self._channel_over = False
        self._how = "exited"
        # The PEM text of the certificate this worker serves, by FTPS service ID: what it was given.
        self.certificates: dict[str, bytes] = {}

    # -- the process ----------------------------------------------------------------

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.transport.writeToChild(0, start_document(self.pool.configuration_text, self.pool.host_keys, self.pool.tls))
        self.transport.closeStdin()
        self.certificates = {service_id: tls.certificate.pem for service_id, tls in self.pool.tls.items()}

    def childDataReceived(self, fd: int, data: bytes) -> None:
        lines = (self._partial.get(fd, b"") + data).split(b"\n")
        self._partial[fd] = lines.pop()[-MAX_LINE:]
        self._relay(fd, lines)

    def _relay(self, fd: int, lines: list[bytes]) -> None:
        """Each line as ``worker N: ...``; one log event per run of lines of one level.

        A busy worker's lines then cost the parent a few log events per read
        rather than one each (formatting an event is most of the cost); in
        the log file a run's later lines follow its first, indented.
        """
        run: list[str] = []
        run_level = None
        for raw in lines:
            text = raw[:MAX_LINE].decode("utf-8", "replace").rstrip("\r")
            if not text:
                continue
            level = LogLevel.warn  # stderr: what Python printed before the worker's logging started
            if fd == 1:
                name, separator, rest = text.partition("\t")
                if separator and name in _LEVELS:
                    level, text = _LEVELS[name], rest
            if run and level is not run_level:
                _log.emit(run_level, "{lines}", lines="\n".join(run))
                run = []
            run_level = level
            run.append(f"worker {self.index}: {text}")
        if run:
            _log.emit(run_level, "{lines}", lines="\n".join(run))

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._partial.items():
            self._relay(fd, [rest])
        self._partial = {1: b"", 2: b""}
        self._process_over = True
        self._how = describe_exit(reason)
        self.pool.worker_exited(self, reason)
        self._maybe_ended()

    def signal(self, name: str) -> None:
        if not self._process_over:
            try:
                self.transport.signalProcess(name)
            except internet_error.ProcessExitedAlready:
                pass

    # -- the channel ----------------------------------------------------------------

    def channel_ready(self) -> None:
        self.ready = True
        _log.info("worker {worker} (pid {pid}) is ready", worker=self.index, pid=self.pid)
        self.pool.send_certificates(self)  # reloaded between its Starting and now

    def channel_lost(self) -> None:
        self._channel_over = True
        self._maybe_ended()

    def _maybe_ended(self) -> None:
        if self._process_over and self._channel_over and not self.ended.called:
            if self.channel is not None:
                # A worker that stops ends its sessions itself; one that dies cannot.
                ended = self.channel.end_open_sessions(self.index, self._how)
                if ended:
                    _log.warn("worker {worker} {how} with {count} sessions open: their session-end events are written "
                              "for it (reason worker-exited)", worker=self.index, how=self._how, count=ended)
            self.ended.callback(self)


class WorkerPool(MultiService):
    """Starts ``[server] workers`` processes serving the FTP/FTPS/SFTP services, and keeps them running."""

    def __init__(self, runtime: Runtime, executable: str = sys.executable):
        super().__init__()
        self.runtime = runtime
        self.reactor = runtime.reactor
        self.configuration = runtime.configuration
        self.count = self.configuration.server.workers
        self.cpus = worker_cpus(self.configuration.server.worker_cpu_affinity)
        self.executable = executable
        with open(self.configuration.path, encoding="utf-8") as config_file:
            self.configuration_text = config_file.read()
        self.sockets: list[SharedListeningSocket] = []
        self.host_keys: dict[str, dict] = {}  # service ID -> SSH key type -> key, loaded once for every worker
        self.tls: dict[str, ServerTLS] = {}  # FTPS service ID -> its certificate, reloaded here on SIGHUP
        self.workers: dict[int, WorkerProcess] = {}
        self._quick_exits: dict[int, int] = {}
        self._restarts: dict[int, object] = {}
        self._stopping = False
        ReloadOnSIGHUP(self.reactor, self.reload_certificates).setServiceParent(self)
        bans = runtime.state.bans
        if isinstance(bans, MemoryBanStore):
            bans.ban_listeners.append(self._announce_ban)

    def add_service(self, settings: ServiceSettings) -> SharedListeningSocket:
        """The parent's part of one FTP/FTPS/SFTP service: its socket; its certificate or host keys loaded now.

        Loaded here, the errors of a certificate or a host key stop
        sftpauth at start as without workers, generated host keys are
        written once, before two workers could race to create them, and
        every worker serves the same key and certificate.
        """
        if settings.type in ("ssh", "sftp"):
            self.host_keys[settings.id] = ssh.load_host_keys(settings, self.configuration.path, self.runtime.data_folder)
        else:
            tls = ftp.service_tls(settings, self.configuration.path)
            if tls is not None:
                self.tls[settings.id] = tls
                DailyDateCheck(self.reactor, tls.check_dates).setServiceParent(self)
        shared = SharedListeningSocket(settings)
        self.sockets.append(shared)
        return shared

    # -- start and stop --------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        if not self.sockets:
            _log.info("workers = {count}, but no FTP, FTPS or SFTP service is enabled: no worker process is started", count=self.count)
            return
        _log.info(
            "starting {count} worker processes for {services}; the Web Manager, the embedded directory{state} "
            "stay in this process (pid {pid})",
            count=self.count,
            services=", ".join(shared.settings.id for shared in self.sockets),
            state=" and the shared state" if isinstance(self.runtime.state.bans, MemoryBanStore) else "",
            pid=os.getpid(),
        )
        for index in range(1, self.count + 1):
            self.spawn(index)

    def stopService(self) -> defer.Deferred:
        self._stopping = True
        for timer in self._restarts.values():
            if timer.active():
                timer.cancel()
        self._restarts.clear()
        live = list(self.workers.values())
        for worker in live:
            worker.signal("TERM")
        killer = self.reactor.callLater(STOP_TIMEOUT, self._kill_remaining)
        stopped = defer.gatherResults([worker.ended for worker in live])

        def done(result):
            if killer.active():
                killer.cancel()
            if live:
                _log.info("the running worker processes have stopped ({count})", count=len(live))
            return defer.maybeDeferred(MultiService.stopService, self)

        return stopped.addBoth(done)

    def _kill_remaining(self) -> None:
        for worker in self.workers.values():
            _log.warn("worker {worker} (pid {pid}) did not stop within {seconds:g}s: killing it", worker=worker.index, pid=worker.pid, seconds=STOP_TIMEOUT)
            worker.signal("KILL")

    def spawn(self, index: int) -> WorkerProcess:
        """Start worker ``index``: its channel on CHANNEL_FD, the services' sockets from FIRST_SOCKET_FD."""
        self._restarts.pop(index, None)
        worker = WorkerProcess(self, index)
        parent_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child_fds: dict[int, object] = {0: "w", 1: "r", 2: "r", CHANNEL_FD: worker_end.fileno()}
        sockets = {}
        for number, shared in enumerate(self.sockets, start=FIRST_SOCKET_FD):
            child_fds[number] = shared.socket.fileno()
            sockets[shared.settings.id] = [number, int(shared.socket.family)]
        arguments = [
            self.executable, "-m", "sftpauth.workers",
            "--config", os.path.abspath(self.configuration.path),
            "--index", str(index),
            "--workers", str(self.count),
            "--sockets", json.dumps(sockets),
        ]
        cpu = cpu_for_worker(index, self.cpus)
        if cpu is not None:
            arguments += ["--cpu", str(cpu)]
        environment = dict(os.environ)
        # The worker imports the same sftpauth as this process, whatever kind of install this is.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(sftpauth.__file__)))
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, environment.get("PYTHONPATH")]))
        try:
            self.reactor.spawnProcess(worker, self.executable, arguments, env=environment, childFDs=child_fds)
        finally:
            worker_end.close()
        worker.channel = ParentSide(
            self.runtime.state, self.runtime.audit, worker.channel_ready, worker.channel_lost, self.runtime.ldap_pools,
            on_starting=lambda: self.send_certificates(worker),  # reloaded since its start document
        )
        try:
            self.reactor.adoptStreamConnection(parent_end.fileno(), socket.AF_UNIX, OneProtocolFactory(worker.channel))
        finally:
            parent_end.close()
        self.workers[index] = worker
        _log.info("worker {worker} started (pid {pid}){where}", worker=index, pid=worker.pid,
                  where="" if cpu is None else f" on CPU {cpu}")
        if isinstance(self.runtime.state.bans, MemoryBanStore):
            for scope, address, seconds in self.runtime.state.bans.live_bans():
                worker.channel.announce_ban(scope, address, seconds)
        return worker

    # -- while running ---------------------------------------------------------------

    def worker_exited(self, worker: WorkerProcess, reason: Failure) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self._stopping or not self.running:
            return
        ran = self.reactor.seconds() - worker.started_at
        quick = self._quick_exits.get(worker.index, 0) + 1 if ran < STABLE_AFTER else 0
        self._quick_exits[worker.index] = quick
        delay = restart_delay(quick)
        _log.warn(
            "worker {worker} (pid {pid}) {how} after {ran:.1f}s; starting it again in {delay:g}s",
            worker=worker.index,
            pid=worker.pid,
            how=describe_exit(reason),
            ran=ran,
            delay=delay,
        )
        self._restarts[worker.index] = self.reactor.callLater(delay, self.spawn, worker.index)

    def reload_certificates(self) -> None:
        """SIGHUP: read the FTPS certificates again, and give the ready workers those that changed.

        A file that cannot be used is logged once, here, and the certificate
        in use is kept everywhere. A worker still starting gets the new one
        before its services listen (:class:`~sftpauth.workers.channel.Starting`)
        or when it is ready (:meth:`WorkerProcess.channel_ready`); while
        sftpauth stops, nothing is reloaded.
        """
        if self._stopping:
            _log.info("SIGHUP: the worker processes are stopping; the FTPS certificates are not reloaded")
            return
        for tls in self.tls.values():
            tls.reload()
        for worker in self.workers.values():
            if worker.ready:
                self.send_certificates(worker)

    def send_certificates(self, worker: WorkerProcess) -> None:
        """Give ``worker`` each certificate in use that differs from the one it has."""
        for service_id, tls in self.tls.items():
            pem = tls.certificate.pem
            if worker.certificates.get(service_id) != pem and worker.channel is not None:
                worker.channel.send_certificate(service_id, pem)
                worker.certificates[service_id] = pem  # the worker logs that it uses it

    def _announce_ban(self, scope: str, address: str, seconds: float) -> None:
        for worker in self.workers.values():
            if worker.channel is not None:
                worker.channel.announce_ban(scope, address, seconds)


def start_document(configuration_text: str, host_keys: dict, tls: Optional[dict] = None) -> bytes:
    """What a worker reads on its standard input: the configuration text, the SSH host keys and the FTPS
    certificates in use (JSON).

    Given by the parent, the keys and certificates are the same in every
    worker: a worker started again after a key file was replaced or removed
    would otherwise show clients another key (a "host key changed"
    warning), and one started after a bad certificate file was put in place
    would not start at all.
    """
    return json.dumps({
        "configuration": configuration_text,
        "ssh_host_keys": {
            service_id: [key.toString("openssh").decode("ascii") for key in keys_by_type.values()]
            for service_id, keys_by_type in host_keys.items()
        },
        "ftps_certificates": {
            service_id: {"path": service_tls.path, "pem": base64.b64encode(service_tls.certificate.pem).decode("ascii")}
            for service_id, service_tls in (tls or {}).items()
        },
    }).encode("utf-8")


def read_start_document(data: str) -> tuple[str, dict, dict]:
    """The worker's side of :func:`start_document`: the configuration text, the host keys and the certificates
    (:class:`~sftpauth.tls.ServerTLS`) by service ID."""
    from twisted.conch.ssh import keys

    document = json.loads(data)
    host_keys = {}
    for service_id, texts in document["ssh_host_keys"].items():
        loaded = [keys.Key.fromString(text.encode("ascii")) for text in texts]
        host_keys[service_id] = {key.sshType(): key for key in loaded}
    tls = {}
    for service_id, given in document["ftps_certificates"].items():
        # The parent checked it; its dates are the parent's to watch, so an expired one is no reason not to start.
        certificate = parse_server_certificate(base64.b64decode(given["pem"], validate=True), given["path"], check_expiry=False)
        tls[service_id] = ServerTLS(given["path"], service_id, maximum_version=ftp.FTPS_MAXIMUM_VERSION, certificate=certificate)
    return document["configuration"], host_keys, tls


def worker_cpus(affinity: str, allowed: Optional[tuple[int, ...]] = None) -> tuple[int, ...]:
    """The CPUs the workers are spread over (``[server] worker_cpu_affinity``); () to leave them to the kernel.

    ``allowed``: the CPUs this process may run on (its affinity: a
    container's cpuset or ``taskset``), read when None. With one CPU there
    is nothing to choose.
    """
    if affinity != "auto":
        return ()
    cpus = tuple(sorted(allowed_cpus() if allowed is None else allowed))
    return cpus if len(cpus) > 1 else ()


def cpu_for_worker(index: int, cpus: tuple[int, ...]) -> Optional[int]:
    """Worker ``index`` (from 1) runs on the index-th CPU, round robin; None: anywhere."""
    return cpus[(index - 1) % len(cpus)] if cpus else None


def restart_delay(quick_exits: int) -> float:
    """Seconds before starting again a worker that exited ``quick_exits`` times in a row soon after its start."""
    return min(MAX_RESTART_DELAY, FIRST_RESTART_DELAY * 2 ** max(0, quick_exits - 1))


def describe_exit(reason: Failure) -> str:
    value = reason.value
    signal_number = getattr(value, "signal", None)
    if signal_number:
        return f"was killed by signal {signal_number}"
    return f"exited with status {getattr(value, 'exitCode', '?')}"
