"""sftpauth.signals: SIGHUP handlers that chain, and never stop the process."""

from __future__ import annotations

import signal

from sftpauth.signals import ConfigurationChangeCheck, ReloadOnSIGHUP, StopCleanly


class ImmediateReactor:
    def __init__(self):
        self.stopped = 0
        self.when_running = []

    def callFromThread(self, function, *args):
        function(*args)

    def callWhenRunning(self, function, *args):
        self.when_running.append((function, args))

    def stop(self):
        self.stopped += 1


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


def test_a_changed_configuration_is_checked_with_the_files_it_names(tmp_path):
    """SIGHUP's check of an edited file reads its certificates as a restart would, not only its options."""
    config = tmp_path / "sftpauth.ini"
    text = f"[server]\ndata_folder = {tmp_path}/data\n\n[services/ftp]\ntype = ftp\nport = 0\n"
    config.write_text(text, encoding="utf-8")
    change = ConfigurationChangeCheck(ImmediateReactor(), str(config))
    assert change._examine() is None  # unchanged
    config.write_text(text + f"\n[services/ftps]\ntype = ftpsi\nport = 0\nssl_certificate = {tmp_path}/missing.pem\n",
                      encoding="utf-8")
    problems = change._examine()
    assert f"{config}:11 [services/ftps] ssl_certificate" in problems
    assert "missing.pem" in problems
    config.write_text(text + "banner = Hello\n", encoding="utf-8")
    assert change._examine() == ""  # changed and valid


def test_sigterm_and_sigint_stop_the_reactor_from_before_the_ports_listen_and_after_it_runs():
    """Handled from privilegedStartService on (a SIGTERM as soon as a port answered ended the process with -15),
    and put back once the reactor runs, which installs its own handlers as it starts."""
    saved = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        early = ImmediateReactor()
        StopCleanly(early).privilegedStartService()
        signal.raise_signal(signal.SIGTERM)
        assert early.stopped == 1
        reactor = ImmediateReactor()
        service = StopCleanly(reactor)
        service.startService()
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, signal.SIG_IGN)  # what the reactor's start-up does: handlers of its own
        [(install, args)] = reactor.when_running
        install(*args)
        signal.raise_signal(signal.SIGINT)
        assert reactor.stopped == 1
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)


def test_a_second_stop_signal_during_the_shutdown_is_only_logged():
    """QA: a second SIGTERM (or a Ctrl-C) while stopping called reactor.stop again: a ReactorNotRunning traceback."""
    from log_capture import captured_logs
    from twisted.logger import formatEvent

    saved = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        reactor = ImmediateReactor()
        StopCleanly(reactor).privilegedStartService()
        with captured_logs() as events:
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGINT)
        assert reactor.stopped == 1
        texts = [formatEvent(event) for event in events if event.get("log_namespace") == "sftpauth.signals"]
        assert texts == ["Received SIGTERM, shutting down.", "Received SIGTERM: already shutting down.",
                         "Received SIGINT: already shutting down."]
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)


def test_sighup_is_ignored_from_the_options_until_its_handler_is_installed():
    """QA: a SIGHUP in the second a start takes (before ReloadOnSIGHUP) ended the process (status 129)."""
    from sftpauth.signals import ignore_sighup_until_handled

    saved = signal.getsignal(signal.SIGHUP)
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        ignore_sighup_until_handled()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        signal.raise_signal(signal.SIGHUP)  # would end pytest with the default action
        handler = lambda number, frame: None  # noqa: E731
        signal.signal(signal.SIGHUP, handler)
        ignore_sighup_until_handled()  # a handler that is there stays
        assert signal.getsignal(signal.SIGHUP) is handler
    finally:
        signal.signal(signal.SIGHUP, saved)
