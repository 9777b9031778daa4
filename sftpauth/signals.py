"""The signals sftpauth handles, besides Twisted's.

- SIGTERM and SIGINT stop the process cleanly, with exit status 0
  (:class:`StopCleanly`);
- SIGHUP never stops it: the process that writes the audit log opens it
  again (log rotation) and the FTPS certificates are reloaded; with
  workers the parent reloads them and sends the workers those that changed
  (:class:`ReloadOnSIGHUP`, one per use, chained). The rest of the
  configuration is not reloaded: when its file changed since the start,
  the parent says so, and whether the new file is valid
  (:class:`ConfigurationChangeCheck`).

Worker processes ignore SIGHUP and SIGINT and handle SIGTERM themselves
(:mod:`sftpauth.workers.worker`).
"""

from __future__ import annotations

import hashlib
import signal
from typing import Callable, Optional

from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.logger import Logger

_log = Logger()


def ignore_sighup_until_handled() -> None:
    """Ignore SIGHUP from now until :class:`ReloadOnSIGHUP` installs its handler.

    Its default action ends the process: a SIGHUP in the second a start
    takes (a log rotation's ``postrotate``) would stop sftpauth silently,
    where "SIGHUP never stops sftpauth". Called from twistd's options, the
    first code of sftpauth's that twistd runs. (A worker ignores SIGHUP from
    the first line of :mod:`sftpauth.workers.__main__`, before its imports.)
    """
    try:
        if signal.getsignal(signal.SIGHUP) == signal.SIG_DFL:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
    except (ValueError, AttributeError, OSError):  # not the main thread, or no SIGHUP (Windows)
        pass


class StopCleanly(Service):
    """SIGTERM (a service manager) and SIGINT (Ctrl-C) shut down cleanly and exit 0.

    Twisted's own handlers make twistd re-raise the signal after the clean
    shutdown, so the process would end "killed by SIGTERM" (status -15), or
    by SIGINT (130 in a shell), as README.rst says it does not. The handlers
    go on before twistd opens the ports (``privilegedStartService``, as
    :class:`ReloadOnSIGHUP`'s), so a SIGTERM sent as soon as a port answers
    does not find the default action, which ends the process at once; and
    again once the reactor runs, since it installs its own as it starts.
    """

    def __init__(self, reactor):
        self._reactor = reactor
        self._stopping = False

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._install()

    def startService(self) -> None:
        super().startService()
        self._install()
        self._reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        try:
            signal.signal(signal.SIGTERM, self._stop)
            signal.signal(signal.SIGINT, self._stop)
        except ValueError:  # not the main thread
            pass

    def _stop(self, number, frame) -> None:
        name = signal.Signals(number).name
        if self._stopping:
            # A second SIGTERM (a service manager's retry) or a Ctrl-C during the shutdown: it
            # goes on as it was (the reactor's stop, called again, would log a traceback).
            _log.info("Received {name}: already shutting down.", name=name)
            return
        self._stopping = True
        _log.info("Received {name}, shutting down.", name=name)
        # Queued until the reactor runs when the signal came before it started.
        self._reactor.callFromThread(self._reactor.stop)


class ReloadOnSIGHUP(Service):
    """Call ``reload`` on SIGHUP while running; other SIGHUP handlers keep running too."""

    def __init__(self, reactor, reload: Callable[[], object]):
        self._reactor = reactor
        self._reload = reload
        self._previous = None
        self._installed = False

    def privilegedStartService(self) -> None:
        # twistd opens the listening ports here, before any startService: a SIGHUP sent as soon as a
        # port answers must already find this handler, or it ends the process (its default action).
        super().privilegedStartService()
        self._install()

    def startService(self) -> None:
        super().startService()
        self._install()  # added to a running service: no privilegedStartService

    def _install(self) -> None:
        if self._installed:
            return
        try:
            self._previous = signal.signal(signal.SIGHUP, self._handle)
        except (ValueError, AttributeError, OSError):  # not the main thread, or no SIGHUP (Windows)
            return
        self._installed = True

    def _handle(self, number, frame) -> None:
        self._reactor.callFromThread(self._reload)
        if callable(self._previous):
            self._previous(number, frame)

    def stopService(self):
        if self._installed and signal.getsignal(signal.SIGHUP) == self._handle:
            signal.signal(signal.SIGHUP, self._previous if self._previous is not None else signal.SIG_DFL)
        self._installed = False
        return super().stopService()


def _file_digest(path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as config_file:
            return hashlib.sha256(config_file.read()).digest()
    except OSError:
        return None


class ConfigurationChangeCheck:
    """On SIGHUP: whether the configuration file changed since the start, and whether it is valid now.

    SIGHUP applies no configuration change (only the audit log and FTPS
    certificates); an administrator who edited the file and sent it must
    hear that a restart is needed, or what is wrong with the new file (a
    certificate it names that cannot be read too, as a restart would find).
    The files are read and checked in a thread.
    """

    def __init__(self, reactor, path: str):
        self._reactor = reactor
        self.path = path
        self._digest = _file_digest(path)

    def check(self) -> defer.Deferred:
        checked = threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._examine)
        return checked.addCallback(self._report).addErrback(
            lambda failure: _log.failure("SIGHUP: cannot check {path}", failure, path=self.path)
        )

    def _examine(self) -> Optional[str]:
        """None when the file is unchanged; "" when it changed and is valid; else its problems.

        Checked as check-config and start-up check it: with the files it names (certificates, host keys...).
        """
        from sftpauth.cli import load_checked_configuration
        from sftpauth.config.errors import ConfigError

        if _file_digest(self.path) == self._digest:
            return None
        try:
            load_checked_configuration(self.path)
        except ConfigError as error:
            return str(error)
        return ""

    def _report(self, problems: Optional[str]) -> None:
        if problems is None:
            return
        if problems:
            _log.error(
                "SIGHUP: {path} changed since sftpauth started and is not valid; sftpauth goes on with the "
                "configuration it started with:\n{problems}",
                path=self.path, problems=problems,
            )
        else:
            _log.warn(
                "SIGHUP: {path} changed since sftpauth started; SIGHUP applies only the audit log and the FTPS "
                "certificates: restart sftpauth to apply the other changes",
                path=self.path,
            )
