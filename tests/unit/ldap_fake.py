"""An in-memory LDAP directory for unit tests of the LDAP method and its extensions.

It stands in for :class:`LDAPServerPool` and :class:`LDAPConnection`: binds
check passwords, searches evaluate equality/presence/and/or/not filters,
every operation is recorded, and an ACL hides chosen attributes from the
entry's owner (as a TOTP secret should be). Answers can be delayed on a
``task.Clock`` to make concurrent logins interleave.
"""

from __future__ import annotations

import textwrap
from typing import Optional, Sequence

from ldaptor.protocols import pureldap
from twisted.internet import defer, task

from sftpauth.auth.ldap.client import INVALID_CREDENTIALS, NO_SUCH_OBJECT, Entry, LDAPResult
from sftpauth.auth.ldap.method import LDAPMethod
from sftpauth.config.loader import parse_configuration
from sftpauth.state import MemoryReplayStore, SharedState

BASE = "dc=example,dc=com"
PEOPLE = f"ou=people,{BASE}"
SERVICE_DN = f"cn=sftpauth,{BASE}"
SERVICE_PASSWORD = "service-pass"


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def matches(filter_object, attributes: dict[str, tuple[str, ...]]) -> bool:
    if isinstance(filter_object, pureldap.LDAPFilter_present):
        return bool(attributes.get(_text(filter_object.value).lower()))
    if isinstance(filter_object, pureldap.LDAPFilter_equalityMatch):
        values = attributes.get(_text(filter_object.attributeDesc.value).lower(), ())
        wanted = _text(filter_object.assertionValue.value).lower()
        return any(value.lower() == wanted for value in values)
    if isinstance(filter_object, pureldap.LDAPFilter_and):
        return all(matches(item, attributes) for item in filter_object)
    if isinstance(filter_object, pureldap.LDAPFilter_or):
        return any(matches(item, attributes) for item in filter_object)
    if isinstance(filter_object, pureldap.LDAPFilter_not):
        return not matches(filter_object.value, attributes)
    raise NotImplementedError(repr(filter_object))


class FakeDirectory:
    """Entries, passwords and an owner-hiding ACL; also the pool the method connects through."""

    def __init__(self, clock: task.Clock):
        self.clock = clock
        self.entries: dict[str, dict[str, tuple[str, ...]]] = {}
        self.passwords: dict[str, str] = {SERVICE_DN.lower(): SERVICE_PASSWORD}
        self.hidden_from_owner: set[str] = set()
        self.latency = 0.0
        self.operations: list[tuple] = []
        self.connections = 0
        self.open_connections = 0

    def add(self, dn: str, password: Optional[str] = None, **attributes) -> None:
        values = {"objectclass": ("top", "person")}
        for name, value in attributes.items():
            values[name.lower()] = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        self.entries[dn.lower()] = values
        self.entries[dn.lower()]["__dn__"] = (dn,)
        if password is not None:
            self.passwords[dn.lower()] = password

    def set(self, dn: str, name: str, *values: str) -> None:
        self.entries[dn.lower()][name.lower()] = tuple(values)

    # LDAPServerPool
    async def connect(self, trace=None, method_id: str = "", for_searches: bool = False, exclude=()) -> "FakeConnection":
        self.connections += 1
        self.open_connections += 1
        return FakeConnection(self)

    def release(self, connection: "FakeConnection") -> None:
        connection.close()


class FakeConnection:
    server = "fake:389"

    def __init__(self, directory: FakeDirectory):
        self.directory = directory
        self.bound: Optional[str] = None
        self.bound_as: Optional[str] = None
        self.closed = False

    async def _answer(self, value):
        if self.directory.latency:
            return await task.deferLater(self.directory.clock, self.directory.latency, lambda: value)
        return value

    async def bind(self, dn: str, password: str) -> LDAPResult:
        directory = self.directory
        directory.operations.append(("bind", dn))
        expected = directory.passwords.get(dn.lower())
        if expected is not None and expected == password:
            self.bound = dn.lower()
            self.bound_as = dn
            return await self._answer(LDAPResult(0, ""))
        self.bound = self.bound_as = None
        return await self._answer(LDAPResult(INVALID_CREDENTIALS, "invalid credentials"))

    async def search(
        self, base: str, scope: int, filter_object, attributes: Sequence[str], size_limit: int = 0
    ) -> tuple[LDAPResult, list[Entry]]:
        directory = self.directory
        directory.operations.append(("search", base, tuple(attributes), self.bound))
        base = base.lower()
        found = []
        for dn, values in directory.entries.items():
            in_scope = dn == base if scope == pureldap.LDAP_SCOPE_baseObject else dn == base or dn.endswith("," + base)
            if in_scope and matches(filter_object, values):
                found.append(self._entry(dn, values, attributes))
        if scope == pureldap.LDAP_SCOPE_baseObject and not found and base not in directory.entries:
            return await self._answer((LDAPResult(NO_SUCH_OBJECT, "no such object"), []))
        return await self._answer((LDAPResult(0, ""), found))

    def _entry(self, dn: str, values: dict, attributes: Sequence[str]) -> Entry:
        wanted = {name.lower() for name in attributes if name != "1.1"}
        hidden = self.directory.hidden_from_owner if self.bound == dn else set()
        visible = {
            name: value
            for name, value in values.items()
            if name in wanted and name not in hidden and name != "__dn__"
        }
        return Entry(values["__dn__"][0], visible)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.directory.open_connections -= 1


def configuration(
    options: str = "",
    extension: str = '{"mfa_attribute": "totpSharedSecret"}',
    tmp_path=None,
    service_account: bool = True,
    entry_point: str = "python:sftpauth.ldap.totp.AugmentedTOTP",
):
    """A configuration whose LDAP method ``directory`` uses an extension (none when ``extension`` is empty)."""
    home = tmp_path if tmp_path is not None else "/srv/ftp"
    lines = ""
    if extension:
        lines = f"extension_entry_point = {entry_point}\nextension_configuration = {extension}\n"
    if service_account:
        lines += f"service_account_dn = {SERVICE_DN}\nservice_account_password = {SERVICE_PASSWORD}\n"
    text = textwrap.dedent(
        f"""
        [server]
        authentications = directory

        [groups/DEFAULT_GROUP]
        home_folder_path = {home}
        create_home_folder = yes

        [authentications/directory]
        type = ldap
        address = 127.0.0.1
        bind_dn = {PEOPLE}
        username_attribute = uid
        manager_search_filter = (objectClass=person)
        """
    ) + lines + textwrap.dedent(options)
    return parse_configuration(text, "/etc/sftpauth/test.ini", "/etc/sftpauth", {})


def make_method(
    directory: FakeDirectory, configuration_object, state: Optional[SharedState] = None, method_id: str = "directory"
) -> LDAPMethod:
    state = state or SharedState(replay=MemoryReplayStore(directory.clock))
    return LDAPMethod(
        configuration_object.authentications[method_id], configuration_object, directory.clock, pool=directory, state=state
    )


def run(coroutine) -> defer.Deferred:
    """A coroutine as a Deferred (fires at once unless the fake directory has latency)."""
    return defer.ensureDeferred(coroutine)
