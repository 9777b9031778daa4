"""The ``application`` method: local [accounts/..] with hashed passwords."""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer

from sftpauth.account import Account, account_for_groups, with_user
from sftpauth.auth.credentials import LoginRequest
from sftpauth.auth.errors import LoginFailed, UnknownUser
from sftpauth.auth.passwords import verify_password
from sftpauth.config.models import AccountSettings, ApplicationAuthenticationSettings, Configuration, local_account_key


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
            local_account_key(account.username): account for account in configuration.accounts.values()
        }
        self._decoy_hash = decoy_hash(self._accounts.values())  # for an account without a password

    def knows(self, username: str) -> bool:
        return local_account_key(username) in self._accounts

    def authenticate(self, request: LoginRequest) -> defer.Deferred:
        return defer.ensureDeferred(self._authenticate(request))

    async def _authenticate(self, request: LoginRequest) -> Account:
        if request.manager:
            raise UnknownUser("local accounts cannot log into the Web Manager")
        settings = self._accounts.get(local_account_key(request.username))
        if settings is None:
            request.trace.add(self.id, "lookup", "no local account with this username")
            raise UnknownUser(f"no [accounts/..] named {request.username!r}")
        await check_local_password(
            self.id, f"accounts/{settings.id}", settings, request, self._run_in_thread, self._decoy_hash
        )
        groups = tuple(self._configuration.groups[group_id] for group_id in settings.group)
        # ${USER} in the account's own folder is its name, as in a group's; nothing is appended.
        own = with_user(settings.home_folder_path, settings.username)
        return account_for_groups(settings.username, self.id, groups, home_folder=own or None)


def decoy_hash(sections) -> str:
    """A password hash of one of ``sections`` (accounts or administrators), to spend a check's time on; "" if none."""
    return next((section.password for section in sections if section.password), "")


async def check_local_password(
    method_id: str, section: str, settings, request: LoginRequest, run_in_thread: Callable[..., defer.Deferred],
    decoy_hash: str = "",
) -> None:
    """An [accounts/..] or [administrators/..] section: enabled, with a password matching its hash.

    argon2/bcrypt are slow by design, so the hash is checked in a thread.
    A disabled section, or one without a password, is refused after a hash
    check too (its own hash, else ``decoy_hash``; the answer ignored): a
    refusal in a few milliseconds where a wrong password takes a hundred
    would tell a client which names are those of disabled accounts.
    """
    request.trace.add(method_id, "lookup", f"found [{section}]")
    refusal = None
    if not settings.enabled:
        refusal = LoginFailed("account-disabled", f"[{section}] is disabled")
    elif not settings.password:
        refusal = LoginFailed("no-password", f"[{section}] has no password")
    matched = False
    stored = settings.password or decoy_hash
    if stored:
        matched = await run_in_thread(verify_password, stored, request.password)
    if refusal is not None:
        raise refusal
    if not matched:
        raise LoginFailed("invalid-password", "the password does not match the stored hash")
    request.trace.add(method_id, "password", "password hash matched")
