"""The one realm: an authenticated :class:`Account` becomes a protocol avatar.

Whatever method logged the user in, the session is locked in the account's
home folder with its primary group's permissions (:mod:`sftpauth.filesystem`).
"""

from __future__ import annotations

from typing import Callable

import attrs
from twisted.conch.interfaces import IConchUser
from twisted.cred.portal import IRealm
from twisted.internet import defer
from twisted.protocols.ftp import IFTPShell
from zope.interface import implementer

from sftpauth.account import Account
from sftpauth.audit import AuditLog
from sftpauth.filesystem import JailedFilesystem


@attrs.frozen
class SessionInfo:
    """The ``mind`` protocols pass to ``portal.login``: where the session runs."""

    service_id: str
    protocol: str
    peer: str


@implementer(IRealm)
class SessionRealm:
    def __init__(self, audit: AuditLog, run_in_thread: Callable[..., defer.Deferred]):
        self._audit = audit
        self._run_in_thread = run_in_thread
        self._end_reason = ""

    def shutting_down(self) -> None:
        """The process is stopping: every session-end from now on says ``reason = shutdown``."""
        self._end_reason = "shutdown"

    def requestAvatar(self, avatarId: Account, mind: SessionInfo, *interfaces):
        account = avatarId
        # home_root: the folder the chain already resolved in a thread (empty when it did not check it).
        filesystem = JailedFilesystem(
            account.home_root or account.home_folder, account.permissions, self._run_in_thread,
            resolved=bool(account.home_root),
        )
        self._audit.record(
            "session-start",
            service=mind.service_id,
            protocol=mind.protocol,
            peer=mind.peer,
            username=account.username,
            method=account.method_id,
            home_folder=account.home_folder,
        )
        ended = []

        def logout() -> None:
            if not ended:
                ended.append(True)
                reason = {"reason": self._end_reason} if self._end_reason else {}
                self._audit.record(
                    "session-end",
                    service=mind.service_id,
                    protocol=mind.protocol,
                    peer=mind.peer,
                    username=account.username,
                    **reason,
                )

        for interface in interfaces:
            if interface is IFTPShell:
                from sftpauth.ftp import JailedFTPShell

                return IFTPShell, JailedFTPShell(filesystem, account.listing_owner), logout
            if interface is IConchUser:
                from sftpauth.ssh import SFTPUser

                user = SFTPUser(account, filesystem)
                return IConchUser, user, logout
        raise NotImplementedError(f"no avatar for {interfaces!r}")
