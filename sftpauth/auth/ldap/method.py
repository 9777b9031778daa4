"""The ``ldap`` authentication method (SPEC §3): terminal, it accepts or rejects.

One login: connect (LDAPServerPool), BIND per ``bind_dn_type`` and read the
entry (:mod:`.dn`), then turn the entry into an :class:`Account` (home
folder, groups, e-mail, full name). The connection is closed with UNBIND
whatever happens. Every step goes into the request's trace, which is what
``sftpauth test-login`` prints.
"""

from __future__ import annotations

from typing import Optional

from sftpauth.account import Account, account_for_groups
from sftpauth.auth.credentials import LoginRequest
from sftpauth.auth.errors import LoginFailed
from sftpauth.auth.ldap.client import LDAPServerPool, LDAPUnavailable, ServerAddress
from sftpauth.auth.ldap.dn import STRATEGIES, Lookup
from sftpauth.config.models import DEFAULT_GROUP, Configuration, LDAPAuthenticationSettings

MEMBER_OF = "memberOf"


class LDAPMethod:
    def __init__(
        self,
        settings: LDAPAuthenticationSettings,
        configuration: Configuration,
        reactor,
        pool: Optional[LDAPServerPool] = None,
    ):
        self.id = settings.id
        self.settings = settings
        self._configuration = configuration
        addresses = [ServerAddress(host, port or settings.port) for host, port in settings.address]
        self.pool = pool or LDAPServerPool(addresses, reactor, settings.timeout)
        self._strategy = STRATEGIES[settings.bind_dn_type]()
        group_ids = settings.base_groups or (DEFAULT_GROUP,)
        self._groups = tuple(configuration.groups[group_id] for group_id in group_ids)
        self._attributes = self._attributes_to_read()

    def _attributes_to_read(self) -> tuple[str, ...]:
        settings = self.settings
        names = [settings.username_attribute, MEMBER_OF]
        if settings.home_folder_attribute is not None:
            names += settings.home_folder_attribute.attributes
        names += [name for name in (settings.email_attribute, settings.full_name_attribute) if name]
        return tuple(dict.fromkeys(names))

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
        lookup = Lookup(settings, request, search_filter, self._attributes, self.id)
        try:
            connection = await self.pool.connect(request.trace, self.id)
        except LDAPUnavailable as error:
            raise LoginFailed("service-unavailable", f"no LDAP server answered: {error}") from None
        try:
            entry = await self._strategy.authenticate(connection, lookup)
        except LDAPUnavailable as error:
            raise LoginFailed("service-unavailable", str(error)) from None
        finally:
            connection.close()
        used = {name: entry.get(name) for name in self._attributes if entry.get(name)}
        request.trace.add(self.id, "entry", f"{entry.dn}: " + "; ".join(f"{k}={list(v)}" for k, v in used.items()))
        return self._account(request, entry)

    def _account(self, request: LoginRequest, entry) -> Account:
        settings = self.settings
        extra = {
            "dn": entry.dn,
            "email": _first(entry.get(settings.email_attribute)) if settings.email_attribute else "",
            "full_name": _first(entry.get(settings.full_name_attribute)) if settings.full_name_attribute else "",
        }
        if request.manager:
            return Account(
                username=request.username, method_id=self.id, home_folder="", permissions=frozenset(), groups=(), **extra
            )
        home = settings.home_folder_attribute.resolve(entry.get) if settings.home_folder_attribute else None
        return account_for_groups(request.username, self.id, self._groups, home_folder=home, **extra)


def _first(values: tuple[str, ...]) -> str:
    return values[0] if values else ""
