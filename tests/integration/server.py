"""Run the real ``twistd -n sftpauth --config FILE`` in a subprocess for tests."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

TWISTD = str(Path(sys.executable).with_name("twistd"))
REPOSITORY = Path(__file__).resolve().parents[2]


# Every port free_port() has handed out in this test session.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback TCP port nobody listens on now, and one this session has not handed out before.

    The probe is closed at once, so the kernel may pick the same port for the
    next probe: it chooses at random among the free ones. Two services of one
    configuration then get one port and the server cannot start (for seven
    ports, about one group in 600). A port is therefore handed out once.
    """
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port



def read_audit(audit: Path) -> list[dict]:
    """The events of an audit log that the server may be writing at this moment.

    Only lines that end with a newline are read: a test that polls the file can
    catch the last line half written (the kernel copies a write page by page).
    They are cut off as bytes, before decoding: the cut may split a character
    of a non-ASCII line (the server writes UTF-8, ensure_ascii=False).
    """
    if not audit.exists():
        return []
    data = audit.read_bytes()
    whole = data[: data.rfind(b"\n") + 1].decode("utf-8").split("\n")[:-1]
    return [json.loads(line) for line in whole if line.strip()]

class SftpauthServer:
    """A running sftpauth process; ``config`` is written to ``folder/sftpauth.ini``."""

    def __init__(
        self, folder: Path, config: str, ports: tuple[int, ...] = (), twistd_options: tuple[str, ...] = ("--pidfile=",),
        cwd: Optional[Path] = None, open_files: Optional[int] = None,
    ):
        self.folder = Path(folder)
        self.twistd_options = twistd_options
        self.cwd = Path(cwd) if cwd is not None else self.folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config_path = self.folder / "sftpauth.ini"
        self.config_path.write_text(config, encoding="utf-8")
        self.log_path = self.folder / "twistd.log"
        self.ports = ports
        self.open_files = open_files  # the soft limit on open files the process starts with (hard: unchanged)
        self.process: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 20.0) -> "SftpauthServer":
        environment = dict(os.environ)
        # twistd finds the plugin through sys.path, whatever kind of install this is.
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), environment.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [TWISTD, "-n", *self.twistd_options, "--logfile", str(self.log_path), "sftpauth", "--config", str(self.config_path)],
            cwd=self.cwd,
            env=environment,
            preexec_fn=None if self.open_files is None else self._lower_open_files,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        waiting = list(self.ports)
        while waiting:
            if self.process.poll() is not None:
                output = self.process.stdout.read().decode(errors="replace")
                raise RuntimeError(f"sftpauth exited with {self.process.returncode}:\n{output}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sftpauth did not listen on {waiting} within {timeout}s\n{self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", waiting[0]), timeout=0.5).close()
                waiting.pop(0)
            except OSError:
                time.sleep(0.05)
        return self

    def _lower_open_files(self) -> None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, hard))

    def stop(self, timeout: float = 15.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"sftpauth did not stop on SIGTERM within {timeout}s\n{self.log_tail()}")
        finally:
            self.process.stdout.close()

    def worker_pids(self) -> set[int]:
        """The live child processes of twistd: its workers when ``[server] workers`` > 1."""
        found = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                    state, parent = stat.read().rsplit(")", 1)[1].split()[:2]
            except OSError:
                continue
            if self.process is not None and int(parent) == self.process.pid and state != "Z":
                found.add(int(entry))
        return found

    def ready_workers(self, count: int = 2, timeout: float = 15.0) -> set[int]:
        """The worker pids once ``count`` of them have said they are ready (``[server] workers`` > 1)."""
        deadline = time.monotonic() + timeout
        while True:
            pids = self.worker_pids()
            ready = {pid for pid in pids if f"(pid {pid}) is ready" in self.log_text()}
            if len(ready) >= count:
                return ready
            if time.monotonic() > deadline:
                raise AssertionError(f"{count} ready workers expected, have {ready}\n{self.log_tail()}")
            time.sleep(0.1)

    def log_text(self) -> str:
        """The whole twistd log, oldest first, including the files twistd rotated away at 1 MB."""
        rotated = sorted(
            (path for path in self.folder.glob(self.log_path.name + ".*") if path.suffix[1:].isdigit()),
            key=lambda path: -int(path.suffix[1:]),
        )
        return "".join(path.read_text(errors="replace") for path in [*rotated, self.log_path] if path.exists())

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def audit_events(self, path: Optional[Path] = None) -> list[dict]:
        return read_audit(path or (self.folder / "audit.jsonl"))

    def wait_for_audit(self, predicate, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.audit_events():
                if predicate(event):
                    return event
            if time.monotonic() > deadline:
                raise AssertionError(f"no audit event matched; events: {self.audit_events()}")
            time.sleep(0.05)

    def wait_for_log(self, predicate: Callable[[str], bool], timeout: float = 10.0) -> str:
        """The server log once ``predicate(log text)`` holds; AssertionError when the time is up or the server exited."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_text()
            if predicate(text):
                return text
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"not logged (server {'exited' if self.process.poll() is not None else 'running'}):\n"
                                     f"{self.log_tail()}")
            time.sleep(0.05)


@contextlib.contextmanager
def serving(server: SftpauthServer) -> Iterator[SftpauthServer]:
    """Run ``server`` for a block; afterwards it must have exited 0 without a traceback in its log."""
    server.start()
    try:
        yield server
    finally:
        status = server.stop()
    log = server.log_text()
    assert "Traceback" not in log, server.log_tail(200)
    assert status == 0, server.log_tail()
