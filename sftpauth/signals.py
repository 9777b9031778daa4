"""The signals sftpauth handles, besides Twisted's.

- SIGTERM and SIGINT stop the process cleanly, with exit status 0
  (:func:`stop_cleanly_on_sigterm`);
- SIGHUP never stops it: each process that writes the audit log opens it
  again (log rotation), FTPS services reload their certificates, and with
  workers the parent passes it on to them (:class:`ReloadOnSIGHUP`, one per
  use, chained).

Worker processes install their own handlers (:mod:`sftpauth.workers.worker`).
"""

from __future__ import annotations

import signal
from typing import Callable

from twisted.application.service import Service
from twisted.logger import Logger

_log = Logger()


def stop_cleanly_on_sigterm(reactor) -> None:
    """SIGTERM (a service manager) and SIGINT (Ctrl-C) shut down cleanly and exit 0.

    Twisted's own handlers make twistd re-raise the signal after the clean
    shutdown, so the process would end "killed by SIGTERM" (status -15), or
    by SIGINT (130 in a shell), as README.rst says it does not.
    """

    def stop(number, frame) -> None:
        _log.info("Received {name}, shutting down.", name=signal.Signals(number).name)
        reactor.callFromThread(reactor.stop)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


class ReloadOnSIGHUP(Service):
    """Call ``reload`` on SIGHUP while running; other SIGHUP handlers keep running too."""

    def __init__(self, reactor, reload: Callable[[], object]):
        self._reactor = reactor
        self._reload = reload
        self._previous = None
        self._installed = False

    def startService(self) -> None:
        super().startService()
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
