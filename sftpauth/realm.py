"""The one realm: an authenticated :class:`Account` becomes a protocol avatar.

Whatever method logged the user in, the session is locked in the account's
home folder with its primary group's permissions (:mod:`sftpauth.filesystem`).
"""

from __future__ import annotations

from typing import Callable, Optional

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
    tls: Optional[bool] = None  # as LoginRequest.tls: FTP sessions say whether their control connection is TLS


# Why an FTP or SFTP session ended: the ``reason`` of its ``session-end`` event.
SESSION_END_REASONS = {
    "logout": "the client said goodbye (FTP QUIT, an SSH disconnect message)",
    "connection-closed": "the client closed the connection without saying goodbye",
    "connection-lost": "the connection broke (reset, a TLS error)",
    "idle-timeout": "nothing came for idle_connection_timeout seconds",
    "protocol-error": "the server closed it after input it could not take",
    "shutdown": "sftpauth is stopping",
}


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
            log_as=f"{mind.protocol} {account.username}",  # each change is a server log line
        )
        self._audit.record(
            "session-start",
            service=mind.service_id,
            protocol=mind.protocol,
            peer=mind.peer,
            username=account.username,
            method=account.method_id,
            home_folder=account.home_folder,
            **({} if getattr(mind, "tls", None) is None else {"tls": mind.tls}),
        )
        ended = []

        def logout(why: str = "") -> None:
            """End the session once; ``why`` is the protocol's reason (:data:`SESSION_END_REASONS`)."""
            if not ended:
                ended.append(True)
                why = self._end_reason or why  # a stop ends every session, whatever else happened
                reason = {"reason": why} if why else {}
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
