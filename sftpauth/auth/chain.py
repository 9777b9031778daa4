"""The authentication chain: methods tried in order, as SFTPPlus does.

A method that accepts or rejects ends the chain; only "unknown user" goes on
to the next. This is the one ICredentialsChecker of the process: every
service (FTP, SFTP, Web Manager, test-login) logs in through it. The
service's security policy (:mod:`sftpauth.auth.policy`) runs before any
method (bans, source filter, denied usernames) and counts every outcome.

:meth:`AuthenticationChain.second_factor` tells a protocol that can ask
more than once (SSH keyboard-interactive) whether the login will need a
code typed after the password, so it can ask for the two separately.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Callable, Mapping, Optional, Protocol

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from sftpauth.account import Account
from sftpauth.audit import AuditLog
from sftpauth.auth.credentials import ILoginRequest, LoginRequest, has_control_characters
from sftpauth.auth.errors import LoginFailed, UnknownUser
from sftpauth.auth.policy import normalise_address
from sftpauth.config.models import Configuration, address_in

if TYPE_CHECKING:
    from sftpauth.auth.policy import SecurityPolicies

MAX_USERNAME = 256
MAX_PASSWORD = 1024
_log = Logger()


@attrs.define(eq=False)
class _LoginInFlight:
    """A login the chain has not answered yet; ``audited`` once its authentication event is written."""

    request: LoginRequest
    started: float
    method_id: str = ""
    audited: bool = False


class AuthenticationMethod(Protocol):
    id: str

    def authenticate(self, request: LoginRequest) -> defer.Deferred:
        """Fire with an :class:`Account`, or fail with UnknownUser / LoginFailed."""

    # Optional, for SSH keyboard-interactive:
    #   def second_factor(self, request: LoginRequest) -> Optional[SecondFactor]
    # From the username and the configuration only (never the password, never
    # LDAP traffic); raise UnknownUser when authenticate() would pass the
    # username on. A method without it never asks for a code.


@attrs.frozen
class SecondFactor:
    """A one-time code the method expects appended to the password (TOTP)."""

    digits: int
    prompt: str = "Verification code:"

    def combine(self, password: str, code: str) -> str:
        """The one string the chain checks: password then code (spaces typed in the code dropped)."""
        return password + "".join(code.split())


def _nothing() -> None:
    pass


def check_input(request: LoginRequest) -> None:
    """Reject absurd input before any method (or LDAP server) sees it."""
    username = request.username
    if not username or not username.strip():
        raise LoginFailed("invalid-username", "the username is empty")
    if len(username) > MAX_USERNAME:
        length = f"over {len(username)}" if request.truncated else str(len(username))  # cut: only a part came
        raise LoginFailed("invalid-username", f"the username is {length} characters long (at most {MAX_USERNAME})")
    if has_control_characters(username):
        raise LoginFailed("invalid-username", "the username contains control characters or invalid bytes")
    if request.malformed:
        raise LoginFailed("invalid-password", request.malformed)
    if not request.password or not request.password.strip(" \t"):
        raise LoginFailed("empty-password", "an empty or blank password is never accepted")
    if len(request.password) > MAX_PASSWORD:
        raise LoginFailed("invalid-password", f"the password is longer than {MAX_PASSWORD} characters")
    if "\0" in request.password:
        raise LoginFailed("invalid-password", "the password contains a NUL character")
    if any("\ud800" <= char <= "\udfff" for char in request.password):
        raise LoginFailed("invalid-password", "the password is not valid UTF-8")


@implementer(ICredentialsChecker)
class AuthenticationChain:
    credentialInterfaces = (ILoginRequest,)

    def __init__(
        self,
        configuration: Configuration,
        methods: Mapping[str, AuthenticationMethod],
        audit: AuditLog,
        run_in_thread: Callable[..., defer.Deferred],
        clock: Callable[[], float] = time.monotonic,
        *,
        policies: Optional["SecurityPolicies"] = None,
    ):
        self._configuration = configuration
        self._methods = methods
        self._audit = audit
        self._run_in_thread = run_in_thread
        self._clock = clock
        # The security policies (sftpauth.auth.policy): checked before any method, told every outcome.
        self._policies = policies
        self._in_flight: set[_LoginInFlight] = set()

    def abandon_logins(self) -> int:
        """The process stops: audit each login still waiting (on an LDAP server, a hash...) as failed, reason
        ``shutdown``, now, while the audit log is open; its answer, if it ever comes, writes nothing. How many.

        Called once the services have stopped (their clients are gone) and
        before the audit log closes (:class:`sftpauth.tap.ServerServices`, a
        worker's shutdown).
        """
        abandoned = [flight for flight in self._in_flight if not flight.audited]
        for flight in abandoned:
            flight.request.trace.add(flight.method_id or "chain", "rejected", "shutdown: sftpauth stopped")
            self._record(flight, "failure", "shutdown", "sftpauth stopped before the login was answered")
        if abandoned:
            _log.info("{count} logins still in progress at the stop are audited as failed (reason shutdown)",
                      count=len(abandoned))
        return len(abandoned)

    def method_ids_for(self, request: LoginRequest) -> tuple[str, ...]:
        service = self._configuration.services.get(request.service_id)
        if service is None:
            return self._configuration.server.authentications
        return self._configuration.authentications_for(service)

    def second_factor(self, request: LoginRequest) -> Optional[SecondFactor]:
        """The code the login of ``request.username`` will need after the password, or None.

        Found as the chain finds the method that handles a username, from
        the username and the configuration only: the password is not
        checked and no LDAP server is asked, so being asked for a code says
        nothing about the password. (It does say which kind of method would
        handle the username, which the timing of a login says as well.)
        """
        for method_id in self.method_ids_for(request):
            method = self._methods.get(method_id)
            if method is None:
                continue
            hook = getattr(method, "second_factor", None)
            if hook is None:
                return None  # a method that never asks for a code
            try:
                return hook(request)
            except UnknownUser:
                continue
            except Exception:
                _log.failure("method {method} cannot tell whether it needs a second factor", method=method_id)
                return None
        return None

    def requestAvatarId(self, credentials: LoginRequest) -> defer.Deferred:
        return defer.ensureDeferred(self.login(credentials))

    async def login(self, request: LoginRequest, only_method: Optional[str] = None) -> Account:
        flight = _LoginInFlight(request, self._clock())
        self._in_flight.add(flight)
        try:
            return await self._login(flight, only_method)
        finally:
            self._in_flight.discard(flight)

    async def _login(self, flight: _LoginInFlight, only_method: Optional[str]) -> Account:
        request = flight.request
        method_id = ""
        policy = self._policies.for_service(request.service_id) if self._policies is not None else None
        release: Callable[[], None] = _nothing
        try:
            if self._policies is not None:
                # One address's flood waits for its own turns (sftpauth.auth.policy.LoginSlots).
                release = await self._policies.login_slot(request.peer)
            if policy is not None:
                await policy.check_before_login(request)
            check_input(request)
            method_ids = (only_method,) if only_method else self.method_ids_for(request)
            account = None
            for method_id in method_ids:
                method = self._methods.get(method_id)
                if method is None:
                    request.trace.add(method_id, "skip", "method is disabled")
                    continue
                request.trace.add(method_id, "try", f"trying method {method_id}")
                flight.method_id = method_id
                try:
                    account = await method.authenticate(request)
                except UnknownUser as unknown:
                    request.trace.add(method_id, "unknown-user", unknown.explanation)
                    continue
                break
            if account is None:
                method_id = ""
                raise LoginFailed("unknown-user", "no authentication method knows this username")
            if request.manager:
                self._check_roles(account, request)
            else:
                account = await self._prepare_home_folder(account, request)
                request.trace.add(method_id, "home-folder", account.home_folder)
        except LoginFailed as failure:
            if flight.audited:  # abandoned at the stop: audited then, counted nowhere
                raise
            flight.method_id = method_id
            request.trace.add(method_id or "chain", "rejected", f"{failure.reason}: {failure.explanation}")
            self._record(flight, "failure", failure.reason, failure.explanation)
            if policy is not None:
                await policy.record(request, "failure", failure.reason)
                await policy.slow_down(failure.reason)
            raise
        except Exception as error:  # a bug or an unexpected answer must not crash a service
            _log.failure("authentication method {method} failed unexpectedly", method=method_id)
            request.trace.add(method_id or "chain", "error", repr(error))
            if not flight.audited:
                flight.method_id = method_id
                self._record(flight, "failure", "internal-error", type(error).__name__)
            raise LoginFailed("internal-error", f"unexpected error: {type(error).__name__}") from error
        finally:
            release()
        if flight.audited:  # abandoned at the stop: it is a failure in the audit log, and to the client
            raise LoginFailed("shutdown", "sftpauth stopped before the login was answered")
        request.trace.add(method_id, "accepted", f"logged in as {account.username}")
        flight.method_id = method_id
        self._record(flight, "success", "", "", account=account.username)
        if policy is not None:
            await policy.record(request, "success")
        return account

    def _check_roles(self, account: Account, request: LoginRequest) -> None:
        """A Web Manager login holding a disabled [roles/ID], or one from outside its source_ip_filter, is refused.

        Both as SFTPPlus does. A test login (``sftpauth test-login``, the Web
        Manager's) has no client address: the filter is then only described.
        """
        for role_id in self._configuration.roles_of(account.roles):
            role = self._configuration.roles[role_id]
            if not role.enabled:
                raise LoginFailed("role-disabled", f"role [roles/{role_id}] is disabled")
            if not role.source_ip_filter:
                continue
            if not request.peer:
                request.trace.add(
                    account.method_id, "roles", f"[roles/{role_id}] source_ip_filter not checked: a test login has no client address"
                )
                continue
            if not address_in(normalise_address(request.peer), role.source_ip_filter):
                raise LoginFailed(
                    "role-source-filtered", f"{request.peer} is not in source_ip_filter of [roles/{role_id}]"
                )

    async def _prepare_home_folder(self, account: Account, request: LoginRequest) -> Account:
        """Check (or create) the home folder in a thread; the account gains its resolved path.

        A test login creates nothing: it says that a login would create the folder.
        """

        def prepare() -> tuple[Optional[str], str]:
            if not os.path.isdir(account.home_folder):
                if not account.create_home_folder:
                    return "the home folder does not exist", ""
                if request.test:
                    return None, ""  # no resolved path: the folder is still to be made
                try:
                    os.makedirs(account.home_folder, mode=0o750, exist_ok=True)
                except OSError as error:
                    return f"the home folder cannot be created: {error.strerror}", ""
            return None, os.path.realpath(account.home_folder)

        problem, root = await self._run_in_thread(prepare)
        if problem is not None:
            raise LoginFailed("home-folder-missing", f"{problem}: {account.home_folder}")
        if not root:
            request.trace.add(account.method_id, "home-folder",
                              "does not exist yet: a login creates it (create_home_folder = yes); a test login does not")
        return attrs.evolve(account, home_root=root)

    def _record(self, flight: _LoginInFlight, outcome: str, reason: str, detail: str, account: str = "") -> None:
        """The login's one authentication event. ``account``: the name a success logged in as, written when it
        is not what was typed (session events use it)."""
        request = flight.request
        flight.audited = True
        self._audit.record(
            "authentication",
            service=request.service_id,
            protocol=request.protocol,
            peer=request.peer,
            username=request.username,
            method=flight.method_id,
            outcome=outcome,
            reason=reason,
            detail=detail,
            duration_ms=round((self._clock() - flight.started) * 1000, 1),
            **({} if request.tls is None else {"tls": request.tls}),
            **({"account": account} if account and account != request.username else {}),
        )
