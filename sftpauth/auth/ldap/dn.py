"""How a username becomes a BIND: one :class:`BindStrategy` per ``bind_dn_type``.

Each strategy walks the configured base DNs top to bottom; the first base
where the account is found decides, and when none has it the reason from
the last one is reported. A wrong password for an account that was found
ends the walk. DNs are built from ldaptor RDN objects, so a username is
always one escaped attribute value (RFC 4514), never DN syntax.
"""

from __future__ import annotations

import re
from typing import Awaitable, Callable, Optional, Sequence

from ldaptor.protocols import pureldap
from ldaptor.protocols.ldap import distinguishedname

from sftpauth.auth.errors import LoginFailed
from sftpauth.auth.ldap import client as ldap
from sftpauth.auth.ldap.client import Entry, LDAPConnection, LDAPResult
from sftpauth.auth.ldap.filters import MATCH_ALL, as_text, both, equals
from sftpauth.config.checks import ATTRIBUTE

SUBTREE = pureldap.LDAP_SCOPE_wholeSubtree
BASE = pureldap.LDAP_SCOPE_baseObject
# RFC 4511 referral: the base is held by another server (another domain of an AD forest). Never chased.
REFERRAL = 10
STRONGER_AUTH_REQUIRED = 8
OPERATIONS_ERROR = 1  # AD: "00002020: Operation unavailable without authentication"
REFERRAL_ADVICE = "not followed; for a forest, point address at a global catalog (port 3268, LDAPS 3269)"
# Active Directory sends at most MaxValRange (1,500) values of an attribute at once, as NAME;range=LOW-HIGH.
_RANGED = re.compile(r"^(?P<name>[^;]+);range=(?P<low>[0-9]+)-(?P<high>[0-9]+|\*)$", re.IGNORECASE)
MAX_RANGE_REQUESTS = 1000

# Active Directory puts a sub-code in the diagnostic message of error 49.
_AD_SUBCODE = re.compile(r"\bdata ([0-9a-fA-F]{3,4})\b")
AD_REASONS = {
    "525": ("unknown-user", "Active Directory: user not found"),
    "52e": ("invalid-password", "Active Directory: invalid password"),
    "530": ("logon-hours", "Active Directory: not permitted to log on at this time"),
    "531": ("workstation", "Active Directory: not permitted to log on from this workstation"),
    "532": ("password-expired", "Active Directory: the password has expired"),
    "533": ("account-disabled", "Active Directory: the account is disabled"),
    "701": ("account-expired", "Active Directory: the account has expired"),
    "773": ("password-must-change", "Active Directory: the password must be changed"),
    "775": ("account-locked", "Active Directory: the account is locked out"),
}


def classify_bind_failure(result: LDAPResult) -> Optional[tuple[str, str]]:
    """Reason and sentence from a directory that says why (AD error 49 sub-codes)."""
    match = _AD_SUBCODE.search(result.message)
    if match:
        return AD_REASONS.get(match.group(1).lower())
    return None


def shown(text: str) -> str:
    """A typed name in quotes for the trace and test-login: ``'AD\\john'`` keeps its one backslash.

    ``repr`` would double it; only characters that cannot be printed are escaped.
    """
    return "'" + "".join(char if char.isprintable() else repr(char)[1:-1] for char in text) + "'"


def dn_text(dn: distinguishedname.DistinguishedName) -> str:
    return dn.getText()


_ESCAPED_BACKSLASH_OR_HEX = re.compile(r"(\\\\)|((?:\\[0-9A-Fa-f]{2})+)")
_DN_SPECIALS = ',+"\\<>;=# '


def _decode_hex_escapes(text: str) -> str:
    """Turn RFC 4514 ``\\XX`` runs into UTF-8 text (ldaptor reads each byte as a character).

    A decoded special character is escaped again with a backslash so the
    DN keeps its structure: ``\\2C`` stays a comma inside a value.
    """

    def decode(match: re.Match) -> str:
        if match.group(1):
            return match.group(1)
        raw = bytes.fromhex(match.group(2).replace("\\", ""))
        try:
            decoded = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{match.group(2)!r} is not UTF-8") from None
        return "".join("\\" + char if char in _DN_SPECIALS else char for char in decoded)

    return _ESCAPED_BACKSLASH_OR_HEX.sub(decode, text)


def parse_dn(text: str) -> distinguishedname.DistinguishedName:
    """A DN from text; raises ValueError with a readable message."""
    try:
        dn = distinguishedname.DistinguishedName(stringValue=_decode_hex_escapes(text))
    except Exception as error:
        raise ValueError(f"{text!r} is not a distinguished name: {error}") from None
    if not dn.listOfRDNs or any(not rdn.attributeTypesAndValues for rdn in dn.listOfRDNs):
        raise ValueError(f"{text!r} is not a distinguished name")
    for rdn in dn.listOfRDNs:
        for part in rdn.attributeTypesAndValues:
            kind = part.attributeType
            if not ATTRIBUTE.match(kind):  # ldaptor takes "=x", "c n=x", and "ou = x" as the type "ou "
                hint = " (write it without spaces around '=')" if ATTRIBUTE.match(kind.strip()) else ""
                raise ValueError(f"{text!r} is not a distinguished name: {kind!r} is not an attribute name{hint}")
    return dn


def normal_dn(dn: str) -> str:
    """``dn`` in one spelling for comparisons (case and spacing as ldaptor writes it, lower case)."""
    try:
        return parse_dn(dn).getText().lower()
    except ValueError:
        return dn.lower()


def child_dn(attribute: str, value: str, base: distinguishedname.DistinguishedName) -> str:
    """``attribute=value,base`` with ``value`` escaped as one RDN value."""
    rdn = distinguishedname.RelativeDistinguishedName(
        attributeTypesAndValues=[distinguishedname.LDAPAttributeTypeAndValue(attributeType=attribute, value=value)]
    )
    return dn_text(distinguishedname.DistinguishedName(listOfRDNs=(rdn,) + base.listOfRDNs))


class Lookup:
    """What a strategy needs: settings, the user's input, attributes to read, a trace."""

    def __init__(self, settings, request, filter_object, attributes: Sequence[str], method_id: str):
        self.settings = settings
        self.request = request
        self.username = request.username
        self.password = request.password
        self.filter = filter_object
        self.attributes = tuple(attributes)
        self.method_id = method_id
        # Set by the method when the user's BIND goes to another kept connection
        # than the searches (client.py, connection reuse); None: the same one.
        self.user_bind: Optional[Callable[[str, str], Awaitable[LDAPResult]]] = None
        # Set by the method when an extension must see the entry before the BIND
        # (TOTP digits from the URI): called with the DN and, for search, the entry
        # found; it may change ``password``.
        self.before_bind: Optional[Callable[[LDAPConnection, str, Optional[Entry]], Awaitable[None]]] = None
        # The servers that failed this login (the method's failover): no connection of it goes there again.
        self.exclude: set = set()

    def trace(self, action: str, detail: str) -> None:
        self.request.trace.add(self.method_id, action, detail)


class BindStrategy:
    """Base: bind as a DN computed from the username, then read the entry."""

    def candidate_dns(self, lookup: Lookup) -> list[str]:
        raise NotImplementedError

    async def authenticate(self, connection: LDAPConnection, lookup: Lookup) -> Entry:
        """The first base where the BIND works, or where the entry exists (wrong password), decides.

        When none does, the detail names every DN tried. A base where the
        directory would not say whether the entry exists outweighs bases
        where it does not: the account may be there (``invalid-credentials``).
        """
        missing: list[str] = []  # why each DN tried is not an account
        undecided: Optional[tuple[str, str]] = None
        for dn in self.candidate_dns(lookup):
            if lookup.before_bind is not None:
                await lookup.before_bind(connection, dn, None)
            result = await connection.bind(dn, lookup.password)
            if result.ok:
                lookup.trace("bind", f"BIND as {dn}: success")
                return await read_entry(connection, lookup, dn)
            lookup.trace("bind", f"BIND as {dn}: {describe(result)}")
            known = classify_bind_failure(result)
            if known is not None and known[0] == "unknown-user":
                missing.append(f"{known[1]}: {dn}")
                continue  # Active Directory says so: try the next base
            if known is not None:
                raise LoginFailed(*known)
            if result.code not in (ldap.INVALID_CREDENTIALS, ldap.NO_SUCH_OBJECT):
                raise LoginFailed("ldap-error", f"BIND as {dn}: {describe(result)}")
            exists = await entry_exists(connection, lookup, dn)
            if exists:
                raise LoginFailed("invalid-password", f"wrong password for {dn}")
            if exists is None:
                undecided = undecided or (
                    "invalid-credentials", f"BIND as {dn} failed and the directory does not say whether it exists")
            else:
                missing.append(f"no entry {dn}")
        if undecided is not None:
            raise LoginFailed(*undecided)
        raise LoginFailed("unknown-user", "; ".join(missing) or "no base DN is configured")


class ParentStrategy(BindStrategy):
    """``username_attribute=USERNAME,BASE`` for each base."""

    def candidate_dns(self, lookup: Lookup) -> list[str]:
        return [child_dn(lookup.settings.username_attribute, lookup.username, base) for base in lookup.settings.bind_dn]


class RelativeStrategy(BindStrategy):
    """USERNAME is a DN fragment such as ``cn=john,ou=det``; each base is appended."""

    def candidate_dns(self, lookup: Lookup) -> list[str]:
        try:
            fragment = parse_dn(lookup.username)
        except ValueError:
            raise LoginFailed("invalid-username", "the username is not a DN fragment (e.g. cn=john,ou=det)") from None
        return [
            dn_text(distinguishedname.DistinguishedName(listOfRDNs=fragment.listOfRDNs + base.listOfRDNs))
            for base in lookup.settings.bind_dn
        ]


class AbsoluteStrategy(BindStrategy):
    """USERNAME is the whole DN; ``bind_dn`` is ignored."""

    def candidate_dns(self, lookup: Lookup) -> list[str]:
        try:
            return [dn_text(parse_dn(lookup.username))]
        except ValueError:
            raise LoginFailed("invalid-username", "the username is not a distinguished name") from None


class DirectUsernameStrategy:
    """The bind name as typed (UPN or ``DOMAIN\\user``), then a search for the entry.

    The search finds an entry by ``username_attribute``, which does not
    prove it is the account that bound: ``OTHER\\john`` of a trusted domain
    binds and the search finds this domain's ``john``; ``john`` plus the
    suffix binds as whoever holds the UPN ``john@...`` and the search finds
    the entry whose ``sAMAccountName`` is ``john``. :class:`BoundAccount`
    settles it, unless the entry was found by ``userPrincipalName`` equal
    to the bind name (unique in an AD forest: the account that bound with it).
    """

    def __init__(self) -> None:
        self.bound_account = BoundAccount()

    async def authenticate(self, connection: LDAPConnection, lookup: Lookup) -> Entry:
        settings = lookup.settings
        bind_name = lookup.username
        if "@" not in bind_name and "\\" not in bind_name:
            # A UPN or DOMAIN\user already names its domain; with the suffix too it could never bind.
            bind_name += settings.username_suffix
        result = await connection.bind(bind_name, lookup.password)
        lookup.trace("bind", f"BIND as {shown(bind_name)}: {'success' if result.ok else describe(result)}")
        if not result.ok:
            known = classify_bind_failure(result)
            if known is not None:
                raise LoginFailed(*known)
            if result.code == ldap.INVALID_CREDENTIALS:
                raise LoginFailed("invalid-credentials", f"BIND as {shown(bind_name)} refused: {describe(result)}")
            raise LoginFailed("ldap-error", f"BIND as {shown(bind_name)}: {describe(result)}")
        attribute = settings.username_attribute
        if attribute.lower() == "userprincipalname":
            value = bind_name
        elif "\\" in lookup.username:
            value = lookup.username.split("\\", 1)[1]
        else:
            value = lookup.username
        try:
            entry = await find_entry(connection, lookup, attribute, value)
        except LoginFailed as failure:
            if failure.reason != "unknown-user":
                raise
            # The password was right, so the account exists: just not where this method looks.
            bases = "; ".join(dn_text(base) for base in settings.bind_dn)
            raise LoginFailed(
                "outside-base-dn",
                f"the directory accepted {shown(bind_name)} but no entry with {attribute}={value!r} is under {bases}"
                f" (an account of another OU, or its {attribute} is not {value!r})",
            ) from None
        if attribute.lower() != "userprincipalname":
            await self.bound_account.confirm(connection, lookup, bind_name, entry)
        return entry


class BoundAccount:
    """Whether the entry found is the account that bound as ``bind_name`` (``bind_dn_type = direct-username``).

    Asked of the directory, as the user that bound, without a second
    password BIND where it can say: that BIND, with another account's
    password, would count toward locking the entry found out. So:

    - ``DOMAIN\\name``: this domain's NetBIOS name, read once from its
      ``crossRef`` in the Configuration partition, or its DNS name, is ``DOMAIN`` (then
      ``name`` is the entry's ``sAMAccountName``, which a domain holds once)
      or is not (another domain's account);
    - ``name@suffix``: the entry holding that ``userPrincipalName`` (unique
      in a forest) in the entry's domain is the entry found, or another one.

    When the directory cannot say (another ``username_attribute``, names
    it does not show, a UPN no entry of the domain holds: AD's implicit
    ``sAMAccountName@dns-domain``, or another domain's), the entry found
    must accept the same password with a BIND as its DN.
    """

    def __init__(self) -> None:
        self._netbios: dict[str, str] = {}  # normal domain DN -> its NetBIOS name, as the directory said

    async def confirm(self, connection: LDAPConnection, lookup: Lookup, bind_name: str, entry: Entry) -> None:
        domain = _domain_of(entry.dn)
        answer = None
        if domain and lookup.settings.username_attribute.lower() == "samaccountname":
            if "\\" in bind_name:
                answer = await self._by_netbios_name(connection, lookup, bind_name.split("\\", 1)[0], domain)
            elif "@" in bind_name:
                answer = await _by_upn(connection, lookup, bind_name, entry, domain)
        if answer is None:
            result = await connection.bind(entry.dn, lookup.password)
            lookup.trace("verify", f"BIND as {entry.dn}, the entry found: {'success' if result.ok else describe(result)}")
            answer = result.ok
        if not answer:
            raise LoginFailed(
                "account-mismatch",
                f"the directory accepted {shown(bind_name)} but the entry found, {entry.dn}, is another account"
                " (a namesake of another domain, or a UPN that is not the entry's"
                f" {lookup.settings.username_attribute} plus username_suffix)",
            )

    async def _by_netbios_name(
        self, connection: LDAPConnection, lookup: Lookup, typed: str, domain: str
    ) -> Optional[bool]:
        key = normal_dn(domain)
        if key not in self._netbios:
            name = await _read_netbios_name(connection, domain)
            if name is None:
                lookup.trace("verify", f"the NetBIOS name of {domain} cannot be read")
                return None
            self._netbios[key] = name
        name = self._netbios[key]
        # The domain's DNS name (ad.example.com\\john) names it too.
        same = typed.lower() in (name.lower(), _dns_name(domain))
        lookup.trace("verify", f"{shown(typed)} is {'' if same else 'not '}the domain of the entry found ({name})")
        return same


def _domain_of(dn: str) -> str:
    """The domain an AD entry is in: the ``DC=`` RDNs that end its DN ('' if none)."""
    try:
        rdns = parse_dn(dn).listOfRDNs
    except ValueError:
        return ""
    tail = []
    for rdn in reversed(rdns):
        if len(rdn.attributeTypesAndValues) != 1 or rdn.attributeTypesAndValues[0].attributeType.lower() != "dc":
            break
        tail.insert(0, rdn)
    return dn_text(distinguishedname.DistinguishedName(listOfRDNs=tuple(tail))) if tail else ""


def _dns_name(domain: str) -> str:
    """``DC=ad,DC=example,DC=com`` as ``ad.example.com``."""
    return ".".join(rdn.attributeTypesAndValues[0].value for rdn in parse_dn(domain).listOfRDNs).lower()


async def _read_netbios_name(connection: LDAPConnection, domain: str) -> Optional[str]:
    """``nETBIOSName`` of the ``crossRef`` whose ``nCName`` is ``domain`` (AD, Samba); None if not shown."""
    configuration = await root_dse_values(connection, "configurationNamingContext")
    if len(configuration) != 1:
        return None
    partitions = f"CN=Partitions,{configuration[0]}"
    _, entries = await connection.search(
        partitions, pureldap.LDAP_SCOPE_singleLevel, both(equals("nCName", domain), equals("objectClass", "crossRef")),
        ("nETBIOSName",), size_limit=2,
    )
    names = entries[0].get("nETBIOSName") if len(entries) == 1 else ()
    return names[0] if len(names) == 1 and names[0] else None


async def _by_upn(connection: LDAPConnection, lookup: Lookup, bind_name: str, entry: Entry, domain: str) -> Optional[bool]:
    by_upn = equals("userPrincipalName", bind_name)
    _, holders = await connection.search(domain, SUBTREE, by_upn, (), size_limit=2)
    if len(holders) != 1:
        lookup.trace("verify", f"search {as_text(by_upn)} under {domain}: {count_entries(holders)}")
        return None
    same = normal_dn(holders[0].dn) == normal_dn(entry.dn)
    lookup.trace("verify", f"{shown(bind_name)} is the UPN of {holders[0].dn}{'' if same else ', another account'}")
    return same


class SearchStrategy:
    """Find the entry as the service account, then BIND as its DN."""

    async def authenticate(self, connection: LDAPConnection, lookup: Lookup) -> Entry:
        await bind_service_account(connection, lookup)
        entry = await find_entry(connection, lookup, lookup.settings.username_attribute, lookup.username)
        if lookup.before_bind is not None:
            await lookup.before_bind(connection, entry.dn, entry)
        # The searching connection stays bound as the service account when the user's BIND can go elsewhere.
        result = await (lookup.user_bind or connection.bind)(entry.dn, lookup.password)
        lookup.trace("bind", f"BIND as {entry.dn}: {'success' if result.ok else describe(result)}")
        if result.ok:
            return entry
        known = classify_bind_failure(result)
        if known is not None:
            raise LoginFailed(*known)
        if result.code == ldap.INVALID_CREDENTIALS:
            raise LoginFailed("invalid-password", f"wrong password for {entry.dn}")
        raise LoginFailed("ldap-error", f"BIND as {entry.dn}: {describe(result)}")


STRATEGIES = {
    "parent": ParentStrategy,
    "relative": RelativeStrategy,
    "absolute": AbsoluteStrategy,
    "direct-username": DirectUsernameStrategy,
    "search": SearchStrategy,
}


def describe(result: LDAPResult) -> str:
    names = {
        OPERATIONS_ERROR: "operations error (1)",
        ldap.INVALID_CREDENTIALS: "invalid credentials (49)",
        ldap.NO_SUCH_OBJECT: "no such object (32)",
        ldap.INSUFFICIENT_ACCESS: "insufficient access (50)",
        # AD with LDAP signing required, Samba's default: simple binds only over TLS
        STRONGER_AUTH_REQUIRED: "stronger authentication required (8; use secure_connection = yes or starttls)",
        ldap.UNWILLING_TO_PERFORM: "unwilling to perform (53)",
        REFERRAL: "referral (10)",
    }
    text = names.get(result.code, f"result code {result.code}")
    return f"{text}: {result.message}" if result.message else text


async def bind_service_account(connection: LDAPConnection, lookup: Lookup) -> None:
    settings = lookup.settings
    if not settings.service_account_dn:
        lookup.trace("bind", "searching anonymously (no service_account_dn)")
        return
    if connection.bound_as == settings.service_account_dn:
        # A kept connection already bound as the service account (client.py: connection reuse).
        lookup.trace("bind", f"already bound as service account {settings.service_account_dn}")
        return
    result = await connection.bind(settings.service_account_dn, settings.service_account_password)
    lookup.trace("bind", f"BIND as service account {settings.service_account_dn}: {'success' if result.ok else describe(result)}")
    if not result.ok:
        raise LoginFailed("service-account-failed", f"the service account BIND failed: {describe(result)}")


def count_entries(entries) -> str:
    return f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"


async def find_entry(connection: LDAPConnection, lookup: Lookup, attribute: str, value: str) -> Entry:
    """Subtree search of each base for ``(&(attribute=value)filter)``: first base with a match wins."""
    by_name = equals(attribute, value)
    for base in lookup.settings.bind_dn:
        base_text = dn_text(base)
        search_filter = both(by_name, lookup.filter)
        result, entries = await connection.search(base_text, SUBTREE, search_filter, lookup.attributes, size_limit=2)
        if not entries and result.code == ldap.NO_SUCH_OBJECT:
            found = f"{describe(result)}, the base DN does not exist"  # not '0 entries': a mistake in bind_dn
        else:
            found = count_entries(entries)
        lookup.trace("search", f"search {as_text(search_filter)} under {base_text}: {found}")
        trace_referrals(lookup, "search", result)
        if len(entries) > 1:
            raise LoginFailed("ambiguous-user", f"{len(entries)} entries match under {base_text}")
        if entries:
            lookup.trace("entry", f"found {entries[0].dn}")
            return await complete_ranged_values(connection, entries[0], lookup)
        if not result.ok and result.code not in (ldap.NO_SUCH_OBJECT, REFERRAL):
            raise LoginFailed("ldap-error", f"search under {base_text}: {describe(result)}")
    if lookup.filter is not None:
        # Tell "no such user" from "not allowed by the filter" for the audit log.
        for base in lookup.settings.bind_dn:
            _, entries = await connection.search(dn_text(base), SUBTREE, by_name, (), size_limit=1)
            lookup.trace("search", f"search {as_text(by_name)} under {dn_text(base)}, without the filter: {count_entries(entries)}")
            if entries:
                raise LoginFailed("filter-mismatch", f"{entries[0].dn} does not match {as_text(lookup.filter)}")
    raise LoginFailed("unknown-user", f"no entry with {attribute}={value!r} under any base DN")


async def root_dse_values(connection: LDAPConnection, attribute: str) -> tuple[str, ...]:
    """The values of one attribute of the root DSE, as this connection may read them (none if not shown)."""
    _, entries = await connection.search("", BASE, MATCH_ALL, (attribute,))
    return entries[0].get(attribute) if entries else ()


async def read_entry(connection: LDAPConnection, lookup: Lookup, dn: str) -> Entry:
    """Read the bound user's own entry, which must match the filter."""
    result, entries = await connection.search(dn, BASE, lookup.filter or MATCH_ALL, lookup.attributes)
    lookup.trace("search", f"read {dn} with filter {as_text(lookup.filter)}: {count_entries(entries)}")
    if entries:
        return await complete_ranged_values(connection, entries[0], lookup)
    if not result.ok and result.code != ldap.NO_SUCH_OBJECT:
        raise LoginFailed("ldap-error", f"reading {dn}: {describe(result)}")
    if lookup.filter is not None:
        _, unfiltered = await connection.search(dn, BASE, MATCH_ALL, ())
        lookup.trace("search", f"read {dn} without the filter: {count_entries(unfiltered)}")
        if unfiltered:
            raise LoginFailed("filter-mismatch", f"{dn} does not match {as_text(lookup.filter)}")
    raise LoginFailed("entry-unreadable", f"the account cannot read its own entry {dn}")


async def entry_exists(connection: LDAPConnection, lookup: Lookup, dn: str) -> Optional[bool]:
    """After a failed BIND, does ``dn`` exist? ``None`` when the directory will not say."""
    if lookup.settings.service_account_dn:
        result = await connection.bind(lookup.settings.service_account_dn, lookup.settings.service_account_password)
        if not result.ok:
            return None
    result, entries = await connection.search(dn, BASE, MATCH_ALL, ())
    if entries:
        return True
    if result.code == ldap.NO_SUCH_OBJECT:
        return False
    return None


def trace_referrals(lookup: Lookup, action: str, result: LDAPResult) -> None:
    """Continuation references or a referral answer: said in the trace, never chased (see client.py)."""
    referrals = getattr(result, "referrals", ())
    if result.code == REFERRAL:
        lookup.trace(action, f"the directory answered with a referral{': ' + result.message if result.message else ''}; {REFERRAL_ADVICE}")
    elif referrals:
        shown = ", ".join(referrals[:3]) + (f" and {len(referrals) - 3} more" if len(referrals) > 3 else "")
        lookup.trace(action, f"{len(referrals)} referral(s) to other partitions ({shown}) {REFERRAL_ADVICE}")


async def complete_ranged_values(connection: LDAPConnection, entry: Entry, lookup: Optional[Lookup] = None) -> Entry:
    """The entry with every ``NAME;range=LOW-HIGH`` value list read to its end, under ``NAME``.

    Active Directory answers a large multi-valued attribute (``member``,
    ``memberOf``) in pieces: the first comes back as ``memberOf;range=0-1499``
    and the next is asked for as ``memberOf;range=1500-*``, until a piece
    ends with ``*``. Without this, a member of many groups would silently
    have no ``memberOf`` at all. An incomplete answer refuses the login
    rather than guessing.
    """
    if not any(_RANGED.match(name) for name in entry.attributes):
        return entry
    attributes = dict(entry.attributes)
    for key in [name for name in attributes if _RANGED.match(name)]:
        match = _RANGED.match(key)
        name = match.group("name")
        values = list(attributes.pop(key))
        high, requests = match.group("high"), 0
        while high != "*":
            requests += 1
            if requests > MAX_RANGE_REQUESTS:
                raise LoginFailed("ldap-error", f"{name} of {entry.dn}: more than {MAX_RANGE_REQUESTS} ranged requests")
            wanted = f"{name};range={int(high) + 1}-*"
            result, found = await connection.search(entry.dn, BASE, MATCH_ALL, [wanted])
            if not found:
                raise LoginFailed("ldap-error", f"reading {wanted} of {entry.dn}: {describe(result)}")
            pieces = [(piece, _RANGED.match(piece)) for piece in found[0].attributes]
            piece = next(((key, ranged) for key, ranged in pieces if ranged and ranged.group("name").lower() == name.lower()), None)
            if piece is None:
                break  # nothing beyond what was read
            values += found[0].attributes[piece[0]]
            high = piece[1].group("high")
        attributes[name.lower()] = attributes.get(name.lower(), ()) + tuple(values)
        if lookup is not None:
            lookup.trace("entry", f"{name}: {len(values)} values, read in {requests + 1} ranged pieces")
    return Entry(entry.dn, attributes)
