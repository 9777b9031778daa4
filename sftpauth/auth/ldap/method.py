"""The ``ldap`` authentication method (SPEC §3): terminal, it accepts or rejects.

One login: connect (LDAPServerPool), BIND per ``bind_dn_type`` and read the
entry (:mod:`.dn`), then turn the entry into an :class:`Account` (home
folder, groups, e-mail, full name). The connection is closed with UNBIND
whatever happens, or given back to the pool for the next login when it is
still sound. Every step goes into the request's trace, which is what
``sftpauth test-login`` prints.
"""

from __future__ import annotations

import unicodedata
from typing import Optional

from sftpauth.account import Account, account_for_groups
from sftpauth.auth.chain import SecondFactor
from sftpauth.auth.credentials import LoginRequest, directory_form
from sftpauth.auth.errors import LoginFailed
from sftpauth.auth.ldap.client import LDAPServerPool, LDAPUnavailable
from sftpauth.auth.ldap.dn import STRATEGIES, Lookup
from sftpauth.auth.ldap.extensions import LDAPExtensions
from sftpauth.auth.ldap.groups import GroupResolver
from sftpauth.config.models import Configuration, LDAPAuthenticationSettings
from sftpauth.state import SharedState, build_state

MEMBER_OF = "memberOf"


class LDAPMethod:
    def __init__(
        self,
        settings: LDAPAuthenticationSettings,
        configuration: Configuration,
        reactor,
        pool: Optional[LDAPServerPool] = None,
        state: Optional[SharedState] = None,
    ):
        self.id = settings.id
        self.settings = settings
        self._configuration = configuration
        # The servers of `address`: failover, health, probes, TLS (client.py)
        self.pool = pool or LDAPServerPool.from_settings(settings, reactor)
        self._strategy = STRATEGIES[settings.bind_dn_type]()
        # base_groups, group_mapping, roles_mapping, group search and nesting (groups.py)
        self.groups = GroupResolver(settings, configuration)
        # The extension (TOTP) of extension_entry_point; its state (used codes) is shared by every service.
        self.extensions = LDAPExtensions.from_settings(settings, reactor, state or build_state("memory", reactor))
        self._attributes = self._attributes_to_read()
        # search with a service account: on the running server its searches keep a connection
        # bound as the service account and the user's BIND borrows another (client.py).
        self._binds_elsewhere = bool(settings.bind_dn_type == "search" and settings.service_account_dn)

    def _attributes_to_read(self) -> tuple[str, ...]:
        settings = self.settings
        names = [settings.username_attribute, MEMBER_OF]
        if settings.home_folder_attribute is not None:
            names += settings.home_folder_attribute.attributes
        names += [name for name in (settings.email_attribute, settings.full_name_attribute) if name]
        names += self.groups.attributes
        names += self.extensions.extra_attributes
        return tuple(dict.fromkeys(names))

    def second_factor(self, request: LoginRequest) -> Optional[SecondFactor]:
        """A code is asked after the password when the extension (TOTP) wants one; LDAP is terminal."""
        digits = self.extensions.second_factor_digits()
        return SecondFactor(digits=digits) if digits else None

    async def authenticate(self, request: LoginRequest) -> Account:
        settings = self.settings
        if request.manager:
            if settings.manager_search_filter is None:
                raise LoginFailed(
                    "manager-denied", "manager_search_filter is empty: LDAP accounts cannot log into the Web Manager"
                )
            search_filter = settings.manager_search_filter
        else:
            search_filter = settings.search_filter
        # Before any LDAP traffic: an extension may take a TOTP code off the password, or reject.
        credentials = await self.extensions.update_credentials(request)
        lookup = Lookup(settings, request, search_filter, self._attributes, self.id)
        lookup.username, lookup.password = credentials.username, credentials.password
        if credentials.read_entry_first:
            lookup.before_bind = lambda connection, dn, entry: self.extensions.entry_before_bind(
                connection, lookup, credentials, dn, entry
            )
        two_connections = self._binds_elsewhere and getattr(self.pool, "keeps_connections", False)
        if two_connections:
            lookup.user_bind = lambda dn, password: self._bind_on_another_connection(request, lookup, dn, password)
        # A server lost in the middle of the login (not an LDAP answer): the whole login again, from
        # the start, on the next server, until every server has failed it, unless an extension
        # already used a single-use TOTP code. A kept connection the server had closed (it
        # restarted, or closes idle ones) is no reason to leave that server: one new connection to
        # it is tried first.
        failed = lookup.exclude  # servers that failed this login
        fresh: set = set()  # servers whose kept connection failed: a new connection was tried
        errors: list[str] = []
        while True:
            try:
                connection = await self.pool.connect(
                    request.trace, self.id, for_searches=two_connections, exclude=failed
                )
            except LDAPUnavailable as error:
                raise LoginFailed("service-unavailable", "; ".join(errors) or f"no LDAP server answered: {error}") from None
            code_used = False
            try:
                try:
                    entry = await self._strategy.authenticate(connection, lookup)
                except LoginFailed as failure:
                    if failure.reason == "invalid-password" and credentials.bind_password_note:
                        failure.explanation += f" ({credentials.bind_password_note})"
                    raise
                code_used = bool(self.extensions)
                # Only after a successful BIND: a wrong password and a wrong code look alike.
                entry = await self.extensions.augment_entry(connection, lookup, entry, credentials)
                # memberOf, plus groups found by group_search_filter and their parents (nested_groups)
                member_of = await self.groups.member_of(connection, lookup, entry, request.manager)
                break
            except LDAPUnavailable as error:
                errors.append(str(error))
                if code_used:
                    raise LoginFailed("service-unavailable", str(error)) from None
                server = error.server or connection.server
                if error.kind == "lost" and server == connection.server and connection.uses and server not in fresh:
                    fresh.add(server)
                else:
                    failed.add(server)
                request.trace.add(self.id, "failover", f"{error}; {self._next_try(failed, server)}")
            finally:
                # Kept for the next login when it is still sound (client.py: connection reuse).
                self.pool.release(connection)
        used = {
            name: entry.get(name)
            for name in self._attributes
            if entry.get(name) and not self.extensions.is_hidden(name)
        }
        request.trace.add(self.id, "entry", f"{entry.dn}: " + "; ".join(f"{k}={list(v)}" for k, v in used.items()))
        return self._account(request, entry, member_of)

    def _next_try(self, failed: set, server) -> str:
        """What the login does after losing ``server``, for the trace."""
        if server not in failed:
            return "trying the login again on a new connection to the same server"
        if any(address not in failed for address in self.pool.addresses):
            return "trying the login again on the next server"
        return "no other server is left to try"

    async def _bind_on_another_connection(self, request: LoginRequest, lookup: Lookup, dn: str, password: str):
        connection = await self.pool.connect(request.trace, self.id, exclude=lookup.exclude)
        try:
            return await connection.bind(dn, password)
        finally:
            self.pool.release(connection)

    def _account(self, request: LoginRequest, entry, member_of: tuple[str, ...] = ()) -> Account:
        settings = self.settings
        extra = {
            "dn": entry.dn,
            "email": _first(entry.get(settings.email_attribute)) if settings.email_attribute else "",
            "full_name": _first(entry.get(settings.full_name_attribute)) if settings.full_name_attribute else "",
        }
        username = self._username(request, entry)
        if request.manager:
            roles = self.groups.roles(entry, member_of)
            for line in roles.explanation:
                request.trace.add(self.id, "roles", line)
            return Account(
                username=username,
                method_id=self.id,
                home_folder="",
                permissions=frozenset(),
                groups=(),
                roles=roles.ids,
                **extra,
            )
        resolution = self.groups.groups(entry, member_of)
        for line in resolution.explanation:
            request.trace.add(self.id, "groups", line)
        groups = tuple(self._configuration.groups[group_id] for group_id in resolution.ids)
        home = settings.home_folder_attribute.resolve(entry.get) if settings.home_folder_attribute else None
        return account_for_groups(username, self.id, groups, home_folder=home, **extra)

    def _username(self, request: LoginRequest, entry) -> str:
        """The entry's own spelling of the username, so ``ALICE`` and ``alice`` share one home.

        LDAP matches usernames ignoring case, width and surrounding spaces
        (NFKC: "ａｌｉｃｅ" is alice); the value stored in ``username_attribute``
        that matches what was typed (or its USER part of ``DOMAIN\\USER``)
        names the account. An entry with one value is named by it: the
        directory found that entry from what was typed, or a DN was typed.
        """
        typed = request.username
        forms = {typed, typed.rsplit("\\", 1)[-1], typed + self.settings.username_suffix}
        stored = entry.get(self.settings.username_attribute)
        for fold in (_folded, _loosely_folded):  # the closest spelling first, among several values
            wanted = {fold(form) for form in forms}
            for value in stored:
                if fold(value) in wanted:
                    return value
        if len(stored) == 1:
            # The directory matched this entry from what was typed (its own rules: "ａｌｉｃｅ" and
            # "ALİCE" are alice to slapd), or a DN was typed: its one value is the account's name.
            return stored[0]
        return typed


def _folded(text: str) -> str:
    """A username as LDAP's caseIgnoreMatch compares it: its directory form, case folded."""
    return directory_form(text).casefold()


def _loosely_folded(text: str) -> str:
    """:func:`_folded` without combining marks ("ALİCE" folds to "i" + U+0307): to pick among an entry's values."""
    decomposed = unicodedata.normalize("NFKD", _folded(text))
    return "".join(char for char in decomposed if not unicodedata.combining(char))


def _first(values: tuple[str, ...]) -> str:
    return values[0] if values else ""
