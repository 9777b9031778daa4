"""Recent audit events for the Web Manager: from the JSON-lines file, else from memory.

With ``[server] audit_log`` set, the events page reads the end of that
file (in a thread: file I/O never runs on the reactor), so it shows what
happened before a restart and what other processes wrote. Without a file,
the events recorded since start-up are kept in memory (a bounded ring).
"""

from __future__ import annotations

import collections
import json
import os
from typing import Callable, Optional

from twisted.internet import defer

from sftpauth.audit import AuditLog, readable

TAIL_BYTES = 4 * 1024 * 1024
MEMORY_EVENTS = 5000
OUTCOMES = ("", "success", "failure")
KINDS = ("authentication", "all")


def read_tail(path: str, max_bytes: int = TAIL_BYTES) -> list[dict]:
    """The events of the last ``max_bytes`` of the file, oldest first; damaged lines are skipped."""
    try:
        with open(path, "rb") as audit_file:
            size = audit_file.seek(0, os.SEEK_END)
            start = max(0, size - max_bytes)
            audit_file.seek(start)
            data = audit_file.read()
    except OSError:
        return []
    lines = data.split(b"\n")
    if start > 0:
        lines = lines[1:]  # the first one is cut
    events = []
    for line in lines:
        if not line.strip():
            continue
        try:
            entry = json.loads(line.decode("utf-8", "replace"))
        except ValueError:
            continue
        if isinstance(entry, dict):
            # A file written before audit.readable existed may hold escaped lone surrogates.
            events.append({key: readable(value) if isinstance(value, str) else value for key, value in entry.items()})
    return events


def matches(entry: dict, username: str = "", outcome: str = "", kind: str = "authentication") -> bool:
    if kind == "authentication" and entry.get("event") != "authentication":
        return False
    if outcome and entry.get("outcome") != outcome:
        return False
    if username and username.casefold() not in str(entry.get("username", "")).casefold():
        return False
    return True


class AuditHistory:
    def __init__(self, audit: AuditLog, run_in_thread: Callable[..., defer.Deferred]):
        self._path = audit.path
        self._run_in_thread = run_in_thread
        self._memory: collections.deque = collections.deque(maxlen=MEMORY_EVENTS)
        if not self._path:
            audit.listeners.append(self._memory.append)

    def all_recent(self) -> defer.Deferred:
        """Every recent event, oldest first."""
        if self._path:
            return self._run_in_thread(read_tail, self._path)
        return defer.succeed(list(self._memory))

    async def recent(
        self, username: str = "", outcome: str = "", kind: str = "authentication", limit: int = 200
    ) -> list[dict]:
        """The newest matching events first, at most ``limit``."""
        events = await self.all_recent()
        found: list[dict] = []
        for entry in reversed(events):
            if matches(entry, username, outcome, kind):
                found.append(entry)
                if len(found) >= limit:
                    break
        return found


MAX_EVENTS = 1000  # the most events a page or an API call shows


def clamp_limit(text: Optional[str], default: int = 200, maximum: int = MAX_EVENTS) -> int:
    try:
        value = int(text) if text else default
    except ValueError:
        return default
    return max(1, min(maximum, value))
