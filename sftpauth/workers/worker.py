"""A worker process: ``python -m sftpauth.workers``, started by the parent (:mod:`.pool`), never by hand.

It reads the configuration text on its standard input, builds its own
Runtime (chain, LDAP pools, realm) whose audit log and, with ``state =
memory``, whose bans and used TOTP codes go to the parent over the channel
on fd 3, and runs the FTP/FTPS/SFTP services on the listening sockets it
inherited. Its log goes to its standard output, one ``LEVEL<TAB>text`` line
each, for the parent to relay.

Signals: SIGTERM stops it (exit 0); SIGINT is left to the parent (a
terminal's Ctrl-C reaches the whole process group, and the parent stops the
workers in order); SIGHUP is ignored: the parent reloads the FTPS
certificates and sends the worker those that changed (:class:`UseCertificate`).
When the channel closes, the parent is gone: the worker stops.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import socket
import sys
import threading
from typing import Optional

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import LogLevel, Logger, eventAsText, globalLogBeginner
from twisted.python.threadable import isInIOThread

from sftpauth import tap
from sftpauth.config.errors import ConfigError
from sftpauth.config.loader import parse_configuration
from sftpauth.listening import adopt_inherited_sockets
from sftpauth.state import ChannelBanStore, StateChannel, channel_state
from sftpauth.tls import CertificateProblem, parse_server_certificate
from sftpauth.workers import CHANNEL_FD
from sftpauth.workers.channel import OneProtocolFactory, Ready, Starting, WorkerAuditLog, WorkerSide
from sftpauth.workers.pool import read_start_document

_log = Logger()
CHANNEL_CLOSE_TIMEOUT = 5.0  # seconds to send what the services recorded while stopping


def parse_arguments(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sftpauth.workers", description="An sftpauth worker process (started by twistd sftpauth).")
    parser.add_argument("--config", required=True, help="the configuration file's path (its text comes on standard input)")
    parser.add_argument("--index", type=int, required=True, help="this worker's number, 1 to --workers")
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--sockets", default="{}", help='JSON: {"service ID": [fd, address family]}')
    parser.add_argument("--cpu", type=int, default=None, help="the CPU to run on ([server] worker_cpu_affinity)")
    return parser.parse_args(argv)


class LineWriter:
    """The worker's log observer: one ``LEVEL<TAB>text`` line per line of each event; the parent adds the time.

    Lines are written once per reactor turn, not once per event: a busy
    worker then wakes its parent a few times per turn rather than once per
    log line. Events of other threads schedule the write through the
    reactor; :meth:`flush` writes what is left at exit.
    """

    def __init__(self, stream, reactor):
        self._stream = stream
        self._reactor = reactor
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._scheduled = False

    def __call__(self, event: dict) -> None:
        text = eventAsText(event, includeTimestamp=False, includeSystem=True)
        if not text:  # an event without text (ftp._QuietPort's): nothing to write
            return
        level = event.get("log_level", LogLevel.info).name
        with self._lock:
            self._pending.extend(f"{level}\t{line}\n" for line in text.splitlines())
            if self._scheduled:
                return
            self._scheduled = True
        if isInIOThread():
            self._reactor.callLater(0, self.flush)
        else:
            self._reactor.callFromThread(self.flush)

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            self._scheduled = False
        if pending:
            self._stream.write("".join(pending))
            self._stream.flush()


class Worker:
    """What one worker process runs; built by :func:`main`, reactor passed in."""

    def __init__(
        self, configuration, index: int, workers: int, sockets: dict, reactor, host_keys: Optional[dict] = None,
        tls: Optional[dict] = None,
    ):
        self.reactor = reactor
        self.index = index
        self.exit_status = 0
        self._stopping = False
        channel = StateChannel(reactor)
        state = channel_state(channel, reactor, workers) if configuration.server.state == "memory" else None
        self.audit = WorkerAuditLog(index, channel, reactor)
        self.runtime = tap.build_runtime(configuration, reactor, state=state, audit=self.audit, host_keys=host_keys, tls=tls)
        bans = self.runtime.state.bans
        self.channel = WorkerSide(
            channel, bans if isinstance(bans, ChannelBanStore) else None, self._parent_gone, self._use_certificate
        )
        for method_id, pool in self.runtime.ldap_pools.items():  # the parent's Web Manager shows what workers find
            pool.state_listeners.append(functools.partial(self.channel.report_server_state, method_id))
        self._on_channel_closed: Optional[defer.Deferred] = None
        adopt_inherited_sockets({service_id: (fd, family) for service_id, (fd, family) in sockets.items()})
        self.top = MultiService()
        tap.add_runtime_services(self.runtime, self.top)
        factories = tap.service_factories()
        for settings in configuration.services.values():
            if settings.enabled and settings.type in tap.WORKER_SERVICE_TYPES:
                factories[settings.type](settings, self.runtime).setServiceParent(self.top)

    def connect(self, fd: int) -> None:
        self.reactor.adoptStreamConnection(fd, socket.AF_UNIX, OneProtocolFactory(self.channel))
        os.close(fd)

    def start(self) -> None:
        """Ask the parent for what changed since the start document (:class:`Starting`), then listen."""
        self.reactor.addSystemEventTrigger("before", "shutdown", self._shutdown)
        self.channel.callRemote(Starting).addCallbacks(lambda ignored: self._start_services(), self._not_started)

    def _not_started(self, failure) -> None:
        # The parent answered with an error, or the channel closed (this errback comes before _parent_gone,
        # which then has nothing more to say): the one line about it. While stopping, nothing to say.
        if not self._stopping:
            _log.error("worker {worker}: the parent did not answer its start: {error}", worker=self.index,
                       error=failure.getErrorMessage())
            self.exit_status = 1
            self.stop()

    def _start_services(self) -> None:
        if self._stopping:
            return
        try:
            self.top.privilegedStartService()
            self.top.startService()
        except Exception:
            _log.failure("worker {worker}: its services cannot start", worker=self.index)
            self.exit_status = 1
            self.stop()
            return
        self.channel.callRemote(Ready)

    def stop(self) -> None:
        if not self._stopping:
            self._stopping = True
            self.reactor.stop()

    def _shutdown(self):
        """Stop the services, then close the channel once what they recorded is sent."""
        self._stopping = True
        self.runtime.portal.realm.shutting_down()  # the services end their sessions as they stop
        stopped = defer.maybeDeferred(self.top.stopService)

        def close_channel(result):
            self.runtime.chain.abandon_logins()  # a login still waiting on its LDAP server gets its event now
            self.audit.flush()
            transport = self.channel.transport
            if transport is None or not transport.connected:
                return result
            closed = defer.Deferred()
            self._on_channel_closed = closed
            transport.loseConnection()
            timer = self.reactor.callLater(CHANNEL_CLOSE_TIMEOUT, lambda: closed.called or closed.callback(None))
            return closed.addBoth(lambda ignored: timer.active() and timer.cancel())

        return stopped.addBoth(close_channel)

    def _use_certificate(self, service_id: str, pem: bytes) -> None:
        """The parent reloaded the certificate of FTPS service ``service_id``: new sessions use it."""
        tls = self.runtime.tls.get(service_id)
        if tls is None:  # both processes read one configuration text: a bug, not news
            _log.warn("worker {worker}: the parent sent a certificate for {service}, which has none here",
                      worker=self.index, service=service_id)
            return
        try:
            certificate = parse_server_certificate(pem, tls.path, check_expiry=False)  # the parent checked it
        except CertificateProblem as problem:
            _log.error("worker {worker}: service {service}: the certificate the parent sent cannot be used, the one in "
                       "use is kept: {problem}", worker=self.index, service=service_id, problem=str(problem))
            return
        tls.use(certificate)

    def _parent_gone(self) -> None:
        closed, self._on_channel_closed = self._on_channel_closed, None
        if closed is not None and not closed.called:
            closed.callback(None)
        if not self._stopping:
            _log.warn("worker {worker}: the channel to the parent process closed; stopping", worker=self.index)
            self.reactor.callLater(0, self.stop)


def keep_to_cpu(cpu: int, index: int, set_affinity=getattr(os, "sched_setaffinity", None)) -> bool:
    """Run this process on ``cpu`` only; before any thread starts, so the thread pools stay there too.

    One reactor per core, each keeping its caches, and no moves between
    cores: with the shared sockets a worker whose core is busy simply
    accepts fewer connections (docs/workers.rst, "CPU affinity"). A CPU
    gone since the parent chose it (a changed cpuset) leaves the worker
    where the kernel puts it.
    """
    try:
        if set_affinity is None:
            raise OSError("this system has no sched_setaffinity")
        set_affinity(0, {cpu})
    except (OSError, ValueError) as error:
        _log.warn("worker {worker}: cannot keep to CPU {cpu} ({error}); it runs on any CPU", worker=index, cpu=cpu, error=error)
        return False
    return True


def main(argv: Optional[list[str]] = None) -> int:
    arguments = parse_arguments(argv)
    document = sys.stdin.read()
    sys.stdin.close()
    from twisted.internet import reactor

    output = LineWriter(sys.stdout, reactor)
    globalLogBeginner.beginLoggingTo([output], redirectStandardIO=False)
    if arguments.cpu is not None:
        keep_to_cpu(arguments.cpu, arguments.index)

    try:
        text, host_keys, tls = read_start_document(document)
    except (ValueError, KeyError, TypeError) as error:  # not started by sftpauth's parent process
        _log.error("worker {worker} cannot start: its standard input is not what sftpauth's parent sends ({error})",
                   worker=arguments.index, error=error)
        output.flush()
        return 1
    try:
        configuration = parse_configuration(text, arguments.config, os.path.dirname(os.path.abspath(arguments.config)), os.environ)
        worker = Worker(configuration, arguments.index, arguments.workers, json.loads(arguments.sockets), reactor,
                        host_keys=host_keys, tls=tls)
    except ConfigError as error:
        _log.error("worker {worker} cannot start:\n{error}", worker=arguments.index, error=str(error))
        output.flush()
        return 1
    worker.connect(CHANNEL_FD)
    # SIGHUP and SIGINT are ignored since the first line of sftpauth.workers.__main__.
    signal.signal(signal.SIGTERM, lambda number, frame: reactor.callFromThread(worker.stop))
    reactor.callWhenRunning(worker.start)
    try:
        reactor.run(installSignalHandlers=False)
    finally:
        output.flush()
    return worker.exit_status
