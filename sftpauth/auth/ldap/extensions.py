"""LDAP method extensions: ``extension_entry_point = python:module.Class``.

An extension takes part in every login of one LDAP method, at three points
(SPEC §3, "TOTP"; docs/extensions.rst tells how to write one):

1. ``updateCredentials(credentials)``: before any LDAP traffic. It may
   change ``credentials.password`` (what the BIND sends), keep private data
   in ``credentials.data``, or reject by raising :class:`LoginFailed`.
2. ``getExtraAttributes()``: attribute names read with the user's entry.
   They are treated as secret: never traced, never logged. With a
   ``service_account_dn`` they are read as the service account, so users
   need no right to read them (they should have none).
   An extension that needs the user's entry to decide what the BIND sends
   (TOTP: the URI says how many digits the code has) sets
   ``credentials.read_entry_first`` and has an optional
   ``updateCredentialsFromEntry(credentials, entry)``, called before the
   BIND with the entry as the service account sees it, when sftpauth can
   read it then (``bind_dn_type = search``, or a service account).
3. ``augmentEntry(entry, credentials, client)``: after a successful BIND,
   with the entry read. Returns a Deferred firing with the entry (the same
   or an augmented one) or failing with :class:`LoginFailed` to reject.

The class is built once per configuration load with the JSON object of
``extension_configuration`` (``sftpauth check-config`` builds it too, so its
constructor must be cheap and side-effect free); a ``ValueError`` from it is
a configuration error at the ``extension_configuration`` line.
"""

from __future__ import annotations

import importlib
import json
from typing import Any, Callable, Mapping, Optional, Sequence

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from validate import ValidateError
from zope.interface import Interface

from sftpauth.auth.credentials import LoginRequest
from sftpauth.auth.errors import LoginFailed
from sftpauth.auth.ldap.client import Entry, LDAPConnection
from sftpauth.auth.ldap.dn import BASE, Lookup, bind_service_account, describe, normal_dn
from sftpauth.auth.ldap.filters import MATCH_ALL
from sftpauth.state import SharedState

PREFIX = "python:"
TOTP_CLASS = "sftpauth.auth.ldap.totp.AugmentedTOTP"
# Names documented elsewhere for the same class: the SPEC's and SFTPPlus's.
ALIASES = {
    "sftpauth.ldap.totp.AugmentedTOTP": TOTP_CLASS,
    "chevah.server.extension.ldap_mfa.AugmentedTOTP": TOTP_CLASS,
}
HOOKS = ("updateCredentials", "getExtraAttributes", "augmentEntry")


class ILDAPExtension(Interface):
    """What an LDAP method extension provides (built with its JSON configuration)."""

    def updateCredentials(credentials):
        """Before the BIND: adjust ``credentials`` (an :class:`LDAPCredentials`) or raise LoginFailed.

        Return the credentials to use (``None`` keeps the same object), or a
        Deferred firing with them.
        """

    def getExtraAttributes():
        """Names of the (secret) attributes to read with the entry."""

    def augmentEntry(entry, credentials, client):
        """After the BIND: a Deferred firing with the entry, or failing with LoginFailed."""


@attrs.frozen
class ExtensionEntryPoint:
    """A resolved ``extension_entry_point``: what was written and the class it names."""

    text: str
    factory: Callable[[Mapping[str, Any]], Any] = attrs.field(eq=False)

    def __str__(self) -> str:
        return self.text


def resolve_entry_point(text: str) -> Optional[ExtensionEntryPoint]:
    """``python:module.Class`` to the class; ``None`` for an empty value; ValueError otherwise."""
    text = text.strip()
    if not text:
        return None
    if not text.startswith(PREFIX):
        raise ValueError(f"{text!r} is not an entry point; expected python:module.Class, e.g. python:sftpauth.ldap.totp.AugmentedTOTP")
    dotted = text[len(PREFIX) :].strip()
    target = ALIASES.get(dotted, dotted)
    module_name, _, class_name = target.rpartition(".")
    if not module_name or not all(part.isidentifier() for part in target.split(".")):
        raise ValueError(f"{text!r} is not an entry point; expected python:module.Class")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # ImportError, or an error raised while importing
        raise ValueError(f"cannot import module {module_name!r}: {type(error).__name__}: {error}") from None
    factory = getattr(module, class_name, None)
    if not isinstance(factory, type):
        # Only a class is ever called: python:os.system must not run with the configuration.
        found = "" if factory is None else f" ({class_name} is of type {type(factory).__name__}, not a class)"
        raise ValueError(f"module {module_name!r} has no class {class_name!r}{found}")
    missing = [name for name in HOOKS if not callable(getattr(factory, name, None))]
    if missing:
        raise ValueError(f"{text} is not an LDAP extension: it has no {', '.join(missing)}")
    return ExtensionEntryPoint(text, factory)


def parse_extension_configuration(text: str) -> Mapping[str, Any]:
    """The JSON object of ``extension_configuration``; ``{}`` for an empty value."""
    text = text.strip()
    if not text:
        return {}

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise ValueError(f"the key {key!r} is given twice")
            result[key] = value
        return result

    try:
        value = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as error:
        where = f"line {error.lineno} column {error.colno}" if "\n" in text else f"column {error.colno}"
        raise ValueError(f"not valid JSON ({error.msg} at {where}); expected an object such as "
                         '{"mfa_attribute": "totpSharedSecret"}') from None
    if not isinstance(value, dict):
        raise ValueError(f"a JSON object {{...}} is expected, not a JSON {type(value).__name__}")
    return value


def load_extension(entry_point: ExtensionEntryPoint, configuration: Mapping[str, Any]) -> Any:
    """Build the extension and check it has the hooks; ValueError says what is wrong."""
    try:
        extension = entry_point.factory(dict(configuration))
    except ValueError as error:
        raise ValueError(f"{entry_point.text}: {error}") from None
    except Exception as error:
        raise ValueError(f"{entry_point.text} cannot be built: {type(error).__name__}: {error}") from None
    missing = [name for name in HOOKS if not callable(getattr(extension, name, None))]
    if missing:
        raise ValueError(f"{entry_point.text} is not an LDAP extension: it has no {', '.join(missing)}")
    extra_attributes(extension)
    return extension


def extra_attributes(extension: Any) -> tuple[str, ...]:
    from sftpauth.config.checks import attribute

    names = extension.getExtraAttributes()
    if isinstance(names, str):
        raise ValueError("getExtraAttributes() must return a list of attribute names, not one string")
    result = []
    for name in names:
        try:
            if not isinstance(name, str) or not attribute(name):
                raise ValidateError(f"{name!r} is not an LDAP attribute name")
        except ValidateError as error:
            raise ValueError(f"getExtraAttributes(): {error}") from None
        result.append(name)
    return tuple(result)


@attrs.define
class LDAPCredentials:
    """One login as extensions see it; ``password`` is what the BIND will send."""

    username: str
    password: str = attrs.field(repr=False)
    request: LoginRequest  # service, protocol, peer, manager, trace: read only
    method_id: str
    clock: IReactorTime  # seconds() is the time of day
    state: SharedState  # state.replay: the TOTP replay store; state.bans: counters and locks (both shared)
    data: dict[str, Any] = attrs.field(factory=dict, repr=False)  # the extensions' own, never logged
    # Set by an extension that wants updateCredentialsFromEntry called before the BIND.
    read_entry_first: bool = False
    # What the service account read of the extension attributes before the BIND, by
    # normalised DN (None: not visible); used again after the BIND instead of a second read.
    read_before_bind: dict[str, Optional[Entry]] = attrs.field(factory=dict, repr=False)
    # Set by an extension whose change of the BIND password may be why a BIND is refused
    # (TOTP: the code's length guessed); added to the invalid-password audit detail.
    bind_password_note: str = ""

    def trace(self, action: str, detail: str) -> None:
        """A step for ``sftpauth test-login``: never a password, code or secret."""
        self.request.trace.add(self.method_id, action, detail)


def refuse_blank_bind_password(password: str) -> None:
    """Whatever an extension did, an empty BIND password is an anonymous bind: never send one (nor a blank one)."""
    if not password or not password.strip(" \t"):
        raise LoginFailed("empty-password", "the password sent to LDAP would be empty or blank")


class LDAPExtensions:
    """The extension(s) of one LDAP method, called by :class:`LDAPMethod` at each step."""

    def __init__(
        self, settings, extensions: Sequence[Any], clock: IReactorTime, state: SharedState
    ):
        self._settings = settings
        self._extensions = tuple(extensions)
        self._clock = clock
        self.state = state
        names: list[str] = []
        for extension in self._extensions:
            names += extra_attributes(extension)
        self.extra_attributes = tuple(dict.fromkeys(names))
        self._hidden = {name.lower() for name in self.extra_attributes}

    @classmethod
    def from_settings(cls, settings, clock: IReactorTime, state: SharedState) -> "LDAPExtensions":
        entry_point = settings.extension_entry_point
        if entry_point is None:
            return cls(settings, (), clock, state)
        return cls(settings, (load_extension(entry_point, settings.extension_configuration),), clock, state)

    def __bool__(self) -> bool:
        return bool(self._extensions)

    def second_factor_digits(self) -> Optional[int]:
        """Digits of a one-time code an extension expects after the password (TOTP), or None."""
        for extension in self._extensions:
            digits = getattr(extension, "secondFactorDigits", None)
            if digits is not None:
                return digits()
        return None

    def is_hidden(self, attribute: str) -> bool:
        """An extension's attribute: its values never go into a trace or a log."""
        return attribute.lower() in self._hidden

    async def update_credentials(self, request: LoginRequest) -> LDAPCredentials:
        credentials = LDAPCredentials(
            username=request.username,
            password=request.password,
            request=request,
            method_id=self._settings.id,
            clock=self._clock,
            state=self.state,
        )
        for extension in self._extensions:
            updated = await defer.maybeDeferred(extension.updateCredentials, credentials)
            if updated is not None:
                credentials = updated
        refuse_blank_bind_password(credentials.password)
        return credentials

    async def augment_entry(
        self, connection: LDAPConnection, lookup: Lookup, entry: Entry, credentials: LDAPCredentials
    ) -> Entry:
        if not self._extensions:
            return entry
        entry = await self._read_as_service_account(connection, lookup, entry, credentials)
        for extension in self._extensions:
            entry = await defer.maybeDeferred(extension.augmentEntry, entry, credentials, connection)
        return entry

    async def entry_before_bind(
        self, connection: LDAPConnection, lookup: Lookup, credentials: LDAPCredentials, dn: str, entry: Optional[Entry]
    ) -> None:
        """Before the BIND as ``dn``: let extensions see the entry (``entry``, or read now) and set ``lookup.password``.

        ``entry`` is the service account's search result (``search``); for the
        other DN types it is read here as the service account, when there is one.
        """
        if not credentials.read_entry_first:
            return
        if entry is None:
            if not self._settings.service_account_dn:
                lookup.trace("search", "no service account to read the entry before the BIND")
                return
            await bind_service_account(connection, lookup)
            entry = await self._service_account_view(connection, lookup, dn)
            credentials.read_before_bind[normal_dn(dn)] = entry
            if entry is None:
                return
        for extension in self._extensions:
            hook = getattr(extension, "updateCredentialsFromEntry", None)
            if hook is not None:
                updated = await defer.maybeDeferred(hook, credentials, entry)
                if updated is not None:
                    credentials = updated
        # The entry may move the split (TOTP: the URI's digits), leaving a blank password.
        refuse_blank_bind_password(credentials.password)
        lookup.password = credentials.password

    async def _read_as_service_account(
        self, connection: LDAPConnection, lookup: Lookup, entry: Entry, credentials: LDAPCredentials
    ) -> Entry:
        """Replace the user's view of the extension attributes by the service account's.

        With ``bind_dn_type = search`` the entry already comes from the
        service account's search. Otherwise the entry was read as the user,
        who should not be able to read a secret such as a TOTP key. When
        the service account read them before the BIND (TOTP digits from
        the URI), that read of the same entry, a few milliseconds old, is
        used: no second BIND and search.
        """
        settings = self._settings
        if not self.extra_attributes or not settings.service_account_dn or settings.bind_dn_type == "search":
            return entry
        key = normal_dn(entry.dn)
        if key in credentials.read_before_bind:
            found = credentials.read_before_bind[key]
            lookup.trace("search", f"{', '.join(self.extra_attributes)} of {entry.dn}: as the service account read them before the BIND")
        else:
            await bind_service_account(connection, lookup)
            found = await self._service_account_view(connection, lookup, entry.dn)
        attributes = {name: values for name, values in entry.attributes.items() if name not in self._hidden}
        if found is not None:
            attributes.update((name, values) for name, values in found.attributes.items() if name in self._hidden)
        return Entry(entry.dn, attributes)

    async def _service_account_view(self, connection: LDAPConnection, lookup: Lookup, dn: str) -> Optional[Entry]:
        """The extension attributes of ``dn`` read on ``connection`` (bound as the service account); None: not visible."""
        result, found = await connection.search(dn, BASE, MATCH_ALL, self.extra_attributes)
        names = ", ".join(self.extra_attributes)
        if not found:
            why = describe(result) if not result.ok else "the entry is not visible"
            lookup.trace("search", f"read {names} of {dn} as the service account: {why}")
            return None
        visible = {name for name in found[0].attributes if name in self._hidden}
        present = ", ".join(name for name in self.extra_attributes if name.lower() in visible) or "none"
        lookup.trace("search", f"read {names} of {dn} as the service account: present: {present}")
        return found[0]
