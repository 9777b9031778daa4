"""Web Manager sessions: random IDs, idle expiry, audit events.

A session is kept in memory by the manager service that opened it (a
restart logs everyone out). Its ID is 256 random bits sent only in a
``Secure; HttpOnly; SameSite=Strict`` cookie; a login always makes a new
one (no fixation). A session unused for ``session_idle_timeout`` seconds,
or opened ``session_lifetime`` seconds ago, ends: at its next request, or
at the sweep (every second), whichever is first. Sessions are kept in the
order of their last use and their IDs in the order of their logins, so
the sweep looks only at the sessions it ends. One username holds at most
MAX_SESSIONS_PER_USER sessions (a new one ends its own least recently
used), and when the store is full a new login is refused
(:class:`TooManySessions`): nobody's login can end somebody else's session.
Every start and end is a ``session-start`` / ``session-end`` audit event,
like FTP and SFTP sessions.
"""

from __future__ import annotations

import collections
import secrets
from typing import Iterable, Optional

import attrs

from sftpauth.audit import AuditLog
from sftpauth.config.models import Configuration, RoleSettings
from sftpauth.manager.csrf import new_token

MAX_SESSIONS = 10000
MAX_SESSIONS_PER_USER = 20  # browsers, tabs and scripts of one person; a header login without cookie makes one each time


class TooManySessions(Exception):
    """The store is full of live sessions: a new one is refused rather than ending another user's."""


@attrs.define
class ManagerSession:
    id: str = attrs.field(repr=False)
    username: str
    roles: tuple[str, ...]
    can_act: bool  # False for read-only roles: they may look, never trigger an action
    method: str  # the authentication method, or "header-authentication"
    csrf_token: str = attrs.field(repr=False)
    peer: str
    created: float
    last_seen: float
    source: str = "password"  # or "header" (pre-authentication by a trusted proxy)
    email: str = ""
    full_name: str = ""
    provider: str = ""

    @property
    def display_name(self) -> str:
        return self.full_name or self.username


def effective_roles(configuration: Configuration, role_ids: Iterable[str]) -> tuple[tuple[str, ...], bool]:
    """Known role IDs (DEFAULT-ROLE when none) and whether any of them may act."""
    known = configuration.roles_of(role_ids)
    roles: list[RoleSettings] = [configuration.roles[role_id] for role_id in known]
    return known, any(not role.read_only for role in roles)


class SessionStore:
    """The open sessions of one manager service; ``clock`` is the reactor (IReactorTime)."""

    def __init__(
        self, clock, idle_timeout: float, audit: AuditLog, service_id: str, limit: int = MAX_SESSIONS,
        per_user: int = MAX_SESSIONS_PER_USER, lifetime: float = 43200,
    ):
        self._clock = clock
        self.idle_timeout = idle_timeout
        self.lifetime = lifetime
        self._logins: collections.deque[tuple[float, str]] = collections.deque()  # (created, ID), oldest first
        self._audit = audit
        self._service_id = service_id
        self._limit = limit
        self._per_user = per_user
        self._sessions: dict[str, ManagerSession] = {}  # by ID, least recently used first
        self._of_user: dict[str, int] = {}  # username -> sessions open

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, username: str, roles: tuple[str, ...], can_act: bool, method: str, peer: str, **extra) -> ManagerSession:
        now = self._clock.seconds()
        if self._of_user.get(username, 0) >= self._per_user:
            own = next(session for session in self._sessions.values() if session.username == username)
            self.close(own, "evicted")  # this user's least recently used
        if len(self._sessions) >= self._limit:
            self.expire_idle()
            if len(self._sessions) >= self._limit:
                raise TooManySessions(f"{len(self._sessions)} Web Manager sessions are open (at most {self._limit})")
        session = ManagerSession(
            id=secrets.token_urlsafe(32),
            username=username,
            roles=roles,
            can_act=can_act,
            method=method,
            csrf_token=new_token(),
            peer=peer,
            created=now,
            last_seen=now,
            **extra,
        )
        self._sessions[session.id] = session
        self._logins.append((now, session.id))
        if len(self._logins) > 2 * self._limit:  # IDs of sessions ended early, behind a live one: dropped
            self._logins = collections.deque(sorted((live.created, live.id) for live in self._sessions.values()))
        self._of_user[username] = self._of_user.get(username, 0) + 1
        self._audit.record(
            "session-start",
            service=self._service_id,
            protocol="manager",
            peer=peer,
            username=username,
            method=method,
            roles=list(roles),
        )
        return session

    def get(self, session_id: Optional[str]) -> Optional[ManagerSession]:
        """The live session with this ID, its idle time reset; None if unknown or expired."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self._clock.seconds()
        if now - session.last_seen >= self.idle_timeout:
            self.close(session, "idle-timeout")
            return None
        if now - session.created >= self.lifetime:
            self.close(session, "lifetime")
            return None
        session.last_seen = now
        self._sessions[session_id] = self._sessions.pop(session_id)  # now the most recently used: last
        return session

    def close(self, session: ManagerSession, reason: str) -> None:
        if self._sessions.pop(session.id, None) is None:
            return
        left = self._of_user.pop(session.username) - 1
        if left:
            self._of_user[session.username] = left
        self._audit.record(
            "session-end",
            service=self._service_id,
            protocol="manager",
            peer=session.peer,
            username=session.username,
            reason=reason,
        )

    def expire_idle(self) -> int:
        """End every idle session, and every session past its lifetime, now; how many ended."""
        now = self._clock.seconds()
        idle = []
        for session in self._sessions.values():  # least recently used first
            if now - session.last_seen < self.idle_timeout:
                break
            idle.append(session)
        for session in idle:
            self.close(session, "idle-timeout")
        ended = len(idle)
        while self._logins and (now - self._logins[0][0] >= self.lifetime or self._logins[0][1] not in self._sessions):
            _, session_id = self._logins.popleft()
            session = self._sessions.get(session_id)
            if session is not None:
                self.close(session, "lifetime")
                ended += 1
        return ended

    def close_all(self, reason: str) -> None:
        for session in list(self._sessions.values()):
            self.close(session, reason)
