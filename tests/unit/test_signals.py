"""sftpauth.signals: SIGHUP handlers that chain, and never stop the process."""

from __future__ import annotations

import signal

from sftpauth.signals import ReloadOnSIGHUP


class ImmediateReactor:
    def callFromThread(self, function, *args):
        function(*args)


def test_sighup_calls_reload_and_the_previous_handler_then_restores_it():
    """While running, SIGHUP calls reload and any handler installed before; stopping puts that handler back."""
    calls = []
    previous = signal.signal(signal.SIGHUP, lambda number, frame: calls.append("previous"))
    try:
        service = ReloadOnSIGHUP(ImmediateReactor(), lambda: calls.append("reload"))
        service.startService()
        signal.raise_signal(signal.SIGHUP)
        assert calls == ["reload", "previous"]
        service.stopService()
        signal.raise_signal(signal.SIGHUP)
        assert calls == ["reload", "previous", "previous"]
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_the_handler_is_in_place_before_the_ports_listen():
    """twistd opens ports in privilegedStartService, before startService: SIGHUP is handled from then on, once."""
    calls = []
    previous = signal.signal(signal.SIGHUP, lambda number, frame: calls.append("previous"))
    try:
        service = ReloadOnSIGHUP(ImmediateReactor(), lambda: calls.append("reload"))
        service.privilegedStartService()
        signal.raise_signal(signal.SIGHUP)
        assert calls == ["reload", "previous"]
        service.startService()  # installs nothing more: one reload per SIGHUP
        signal.raise_signal(signal.SIGHUP)
        assert calls == ["reload", "previous", "reload", "previous"]
        service.stopService()
        signal.raise_signal(signal.SIGHUP)
        assert calls == ["reload", "previous", "reload", "previous", "previous"]
    finally:
        signal.signal(signal.SIGHUP, previous)
