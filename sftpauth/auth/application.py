"""The ``application`` method: local [accounts/..] with hashed passwords."""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer

from sftpauth.account import Account, account_for_groups
from sftpauth.auth.credentials import LoginRequest
from sftpauth.auth.errors import LoginFailed, UnknownUser
from sftpauth.auth.passwords import verify_password
from sftpauth.config.models import AccountSettings, ApplicationAuthenticationSettings, Configuration


class ApplicationMethod:
    """Knows the accounts of the configuration file; unknown names go on."""

    def __init__(
        self,
        settings: ApplicationAuthenticationSettings,
        configuration: Configuration,
        run_in_thread: Callable[..., defer.Deferred],
    ):
        self.id = settings.id
        self._configuration = configuration
        self._run_in_thread = run_in_thread
        self._accounts: dict[str, AccountSettings] = {
            account.username: account for account in configuration.accounts.values()
        }

    @defer.inlineCallbacks
    def authenticate(self, request: LoginRequest):
        if request.manager:
            raise UnknownUser("local accounts cannot log into the Web Manager")
        settings = self._accounts.get(request.username)
        if settings is None:
            request.trace.add(self.id, "lookup", "no local account with this username")
            raise UnknownUser(f"no [accounts/..] named {request.username!r}")
        request.trace.add(self.id, "lookup", f"found [accounts/{settings.id}]")
        if not settings.enabled:
            raise LoginFailed("account-disabled", f"[accounts/{settings.id}] is disabled")
        if not settings.password:
            raise LoginFailed("no-password", f"[accounts/{settings.id}] has no password")
        matched = yield self._run_in_thread(verify_password, settings.password, request.password)
        if not matched:
            raise LoginFailed("invalid-password", "the password does not match the stored hash")
        request.trace.add(self.id, "password", "password hash matched")
        groups = tuple(self._configuration.groups[group_id] for group_id in settings.group)
        account: Account = account_for_groups(
            settings.username, self.id, groups, home_folder=settings.home_folder_path or None
        )
        return account
