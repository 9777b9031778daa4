"""The audit log: one JSON line per authentication attempt and session event.

Callers pass only what may be shown: never a password, TOTP code or secret.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import threading
from typing import Any, Callable, Optional

from twisted.logger import Logger

_log = Logger()
MAX_FIELD = 256


def readable(value: str) -> str:
    """``value`` as valid Unicode: bytes a client sent that are not UTF-8 (lone surrogates) become ``\\xff`` text.

    Every reader of the audit log (the Web Manager, Redis, a JSON tool)
    then gets text it can encode, and the administrator sees the bytes.
    """
    if value.isascii() or not any("\ud800" <= char <= "\udfff" for char in value):
        return value
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # surrogates that are not escaped bytes
        return value.encode("utf-8", "backslashreplace").decode("utf-8")


def shorten(value: str) -> str:
    """Keep audit lines bounded when a client sends a huge username."""
    if len(value) <= MAX_FIELD:
        return value
    return value[:MAX_FIELD] + f"...[{len(value)} characters]"


def path_problem(path: str) -> str:
    """Why :class:`AuditLog` could not open ``path`` for appending, or "" (nothing is created here).

    Missing folders are no problem: the log creates them.
    """
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if os.path.isdir(path):
        return "it is a folder"
    if os.path.exists(path):
        return "" if os.access(path, os.W_OK) else "this user may not write to it"
    if not os.path.isdir(existing):
        return f"{existing} is not a folder"
    return "" if os.access(existing, os.W_OK | os.X_OK) else f"this user may not create files in {existing}"


def cannot_open(path: str, error: Optional[OSError] = None) -> str:
    """The message for an audit log that cannot be opened: the reason in words, not an errno."""
    reason = path_problem(path) or (error.strerror if error is not None and error.strerror else str(error or ""))
    return f"cannot open the audit log {path}: {reason}"


def encode(entry: dict) -> str:
    """An entry as its line of the audit file: JSON, UTF-8 text, never a newline.

    record() already made the fields readable; an entry encoded as is gets the
    same treatment: a UTF-8 file cannot hold lone surrogates.
    """
    return readable(json.dumps(entry, ensure_ascii=False, sort_keys=False))


def _open(path: str):
    """The audit file, appended to without a buffer: each write goes to the file at once, or fails at once."""
    return open(path, "ab", buffering=0)


class AuditLog:
    def __init__(
        self,
        path: str = "",
        now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.timezone.utc),
        echo: Optional[bool] = None,
    ):
        self.path = path
        self._now = now
        # Each event also goes to the server log only when there is no audit file
        # (default): with one, a second copy per event would only cost time.
        self.echo = not path if echo is None else echo
        self._lock = threading.Lock()
        self._file = None
        self._lost = 0  # events not written since the file last took a write (a full disk)
        self._cut = False  # the last write stopped inside a line: the next one starts on a new line
        if path:  # what path_problem() checks without creating anything
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._file = _open(path)
        self.listeners: list[Callable[[dict], None]] = []

    def record(self, event: str, **fields: Any) -> dict:
        entry = {"time": self._now().isoformat(timespec="milliseconds"), "event": event}
        entry.update({key: shorten(readable(value)) if isinstance(value, str) else value for key, value in fields.items()})
        return self.publish(entry)

    def publish(self, entry: dict) -> dict:
        """Write a finished entry and tell the listeners."""
        self.publish_lines([(entry, encode(entry))])
        return entry

    def publish_lines(self, entries: list[tuple[dict, str]]) -> None:
        """Write entries already encoded by :func:`encode`, in one write, then tell the listeners.

        With workers, the parent publishes each worker's batch so: the lines
        come as the worker encoded them, and are written without a second
        encoding (sftpauth.workers).
        """
        data = "".join(line + "\n" for _, line in entries).encode("utf-8")
        with self._lock:
            written = self._file is None or self._write(data, len(entries))
        for entry, line in entries:
            if self.echo:
                _log.info("audit {line}", line=line)
            elif not written:
                _log.warn("audit (not in {path}) {line}", path=self.path, line=line)
            for listener in self.listeners:
                listener(entry)

    def _write(self, data: bytes, count: int) -> bool:
        """Write ``data`` (``count`` events) to the file; False, with one error line per outage, when it cannot.

        A full disk or an I/O error must not fail the login or session being
        recorded, nor stop a service: the events then go to the server log
        (publish_lines), and the file is tried again at the next event. The
        file is unbuffered, so an event that could not be written is never
        written later (under a later event's outcome), and a line cut by the
        disk filling up is ended before the next one.
        """
        if self._cut:
            data = b"\n" + data
        done = 0
        try:
            while done < len(data):
                wrote = self._file.write(data[done:])
                if not wrote:  # no byte taken and no error: trying again would spin in the reactor
                    raise OSError(errno.EIO, "the audit file took no bytes")
                done += wrote
        except OSError as error:
            if done:
                self._cut = data[done - 1 : done] != b"\n"
            if not self._lost:
                _log.error(
                    "cannot write the audit log {path}: {error}; its events go to the server log until it can be "
                    "written again (sftpauth keeps running)",
                    path=self.path, error=error.strerror or str(error),
                )
            self._lost += count
            return False
        self._cut = False
        if self._lost:
            _log.info("audit log {path} written again; {count} event(s) before this are only in the server log",
                      path=self.path, count=self._lost)
            self._lost = 0
        return True

    def reopen(self) -> None:
        """Open the file again by its path (SIGHUP), so that logrotate can move it away.

        What is written from then on goes to a new file at ``path``; a file
        that cannot be opened leaves the old one in use, with an error line.
        """
        if not self.path:
            return
        try:
            new = _open(self.path)
        except OSError as error:
            _log.error("SIGHUP: cannot open the audit log {path} again ({error}); writing on to the file already open",
                       path=self.path, error=str(error))
            return
        with self._lock:
            old, self._file = self._file, new
        if old is not None:
            old.close()
        _log.info("SIGHUP: audit log {path} opened again", path=self.path)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
