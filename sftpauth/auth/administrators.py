"""Local Web Manager administrators: the [administrators/..] sections.

SFTPPlus semantics: the ``application`` method (DEFAULT-AUTHENTICATION)
knows the file's local accounts for file transfer and the file's
administrators for the Web Manager. :class:`LocalMethod` is that method;
it sends manager logins to :class:`AdministratorsMethod` and every other
login to the accounts, so an administrator's password never opens an FTP
or SFTP session and an account's never opens the Web Manager.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer

from sftpauth.account import Account
from sftpauth.auth.application import ApplicationMethod, check_local_password, decoy_hash
from sftpauth.auth.credentials import LoginRequest
from sftpauth.auth.errors import UnknownUser
from sftpauth.auth.passwords import verify_password
from sftpauth.config.models import AdministratorSettings, ApplicationAuthenticationSettings, Configuration


class AdministratorsMethod:
    """Knows the [administrators/..]; only for Web Manager (``manager``) logins."""

    def __init__(
        self,
        method_id: str,
        configuration: Configuration,
        run_in_thread: Callable[..., defer.Deferred],
    ):
        self.id = method_id
        self._run_in_thread = run_in_thread
        self._administrators: dict[str, AdministratorSettings] = {
            administrator.username: administrator for administrator in configuration.administrators.values()
        }
        # An unknown name, or one without a password, is checked against this hash too (the answer
        # ignored): otherwise a wrong password is answered in ~10 ms for a name that is not an
        # administrator's and ~150 ms for one that is, which tells an attacker the local administrators' names.
        self._decoy_hash = decoy_hash(self._administrators.values())

    def knows(self, username: str) -> bool:
        return username in self._administrators

    async def authenticate(self, request: LoginRequest) -> Account:
        if not request.manager:
            raise UnknownUser("administrators can only log into the Web Manager")
        settings = self._administrators.get(request.username)
        if settings is None:
            request.trace.add(self.id, "lookup", "no local administrator with this username")
            if self._decoy_hash:
                await self._run_in_thread(verify_password, self._decoy_hash, request.password)
            raise UnknownUser(f"no [administrators/..] named {request.username!r}")
        await check_local_password(
            self.id, f"administrators/{settings.id}", settings, request, self._run_in_thread, self._decoy_hash
        )
        request.trace.add(self.id, "roles", f"roles: {', '.join(settings.roles)}")
        return Account(
            username=settings.username,
            method_id=self.id,
            home_folder="",
            permissions=frozenset(),
            groups=(),
            roles=settings.roles,
        )


class LocalMethod:
    """An ``application`` method: local accounts for file transfer, administrators for the Web Manager."""

    def __init__(
        self,
        settings: ApplicationAuthenticationSettings,
        configuration: Configuration,
        run_in_thread: Callable[..., defer.Deferred],
    ):
        self.id = settings.id
        self.accounts = ApplicationMethod(settings, configuration, run_in_thread)
        self.administrators = AdministratorsMethod(settings.id, configuration, run_in_thread)

    def second_factor(self, request: LoginRequest) -> None:
        """Local accounts and administrators never ask for a code; unknown names go on."""
        known = self.administrators.knows if request.manager else self.accounts.knows
        if not known(request.username):
            raise UnknownUser("not a local account")
        return None

    def authenticate(self, request: LoginRequest) -> defer.Deferred:
        if request.manager:
            return defer.ensureDeferred(self.administrators.authenticate(request))
        return self.accounts.authenticate(request)
