"""Which sftpauth groups (or Web Manager roles) an LDAP account gets.

Three parts, each built once when the configuration loads:

* :class:`GroupMapping`: ``group_mapping`` / ``roles_mapping`` rules
  ``ATTRIBUTE, EXPRESSION, ID[, ID...]`` tried top-down, first match wins;
  leading lines with a single bare ID are the fallback (the older SFTPPlus
  form) used when no rule matches.
* :class:`FilterTemplate`: ``group_search_filter`` with ``{username}`` and
  ``{dn}`` placeholders. The template is parsed once with a sentinel in
  place of each placeholder; at login the sentinels in the parsed ldaptor
  filter objects are replaced by the values. User data is never formatted
  into filter text, so it cannot change the filter's structure.
* :class:`GroupResolver`: at login, the entry's ``memberOf`` values plus the
  group DNs found by ``group_search_filter`` plus, with ``nested_groups``,
  their parents (one search per level, cycle-safe, at most
  :data:`MAX_NESTING` levels; on Active Directory one search with its
  in-chain matching rule instead) become the account's ``memberOf``; then the
  mapping, ``base_groups`` and ``external_groups_association`` give the
  final group IDs, and every decision is written to the login's trace.
"""

from __future__ import annotations

import copy
import re
from typing import Callable, Iterable, Mapping, Optional, Sequence

import attrs
from ldaptor import ldapfilter
from ldaptor.protocols import pureldap
from ldaptor.protocols.ldap import distinguishedname

from sftpauth.auth.errors import LoginFailed
from sftpauth.auth.ldap.client import Entry, LDAPConnection
from sftpauth.auth.ldap.dn import SUBTREE, Lookup, bind_service_account, describe, parse_dn, root_dse_values, trace_referrals
from sftpauth.auth.ldap.filters import as_text
from sftpauth.config.checks import ATTRIBUTE, ATTRIBUTE_NAME
from sftpauth.config.models import DEFAULT_GROUP, DEFAULT_ROLE, Configuration, LDAPAuthenticationSettings
from sftpauth.matching import InvalidExpression, MatchingExpression, compile_expression

MEMBER_OF = "memberof"
MAX_NESTING = 10
# Active Directory's LDAP_MATCHING_RULE_IN_CHAIN: the directory itself walks nested groups.
IN_CHAIN_RULE = "1.2.840.113556.1.4.1941"
# LDAP_CAP_ACTIVE_DIRECTORY_OID in the root DSE's supportedCapabilities (Samba's AD DC has it too)
ACTIVE_DIRECTORY_CAPABILITY = "1.2.840.113556.1.4.800"
PLACEHOLDERS = ("username", "dn")
_SENTINEL = "sftpauthPlaceholder{}7f3c"
_RDN = re.compile(rf"^{ATTRIBUTE_NAME}=")  # "cn=...": one RDN of a DN
_IDENTIFIER_FORBIDDEN = ("/", "|")
_TYPED_EXPRESSION = re.compile(r"^\s*([A-Za-z]/.*/[A-Za-z]*)\s*(?:,(.*))?$", re.DOTALL)
_SHOWN_VALUES = 5


# -- DNs ------------------------------------------------------------------------------


def normalise_dn(text: str) -> str:
    """A DN in one canonical, lower-case form, for case-insensitive comparison.

    Attribute types and values are lower-cased, insignificant spaces dropped
    (as caseIgnoreMatch does), hex escapes decoded and the attribute-value
    pairs of a multi-valued RDN sorted. Raises ValueError for text that is
    not a DN.
    """
    dn = parse_dn(text.strip())  # hex escapes decoded as UTF-8; ValueError when not a DN
    rdns = []
    for rdn in dn.listOfRDNs:
        pairs = []
        for pair in rdn.attributeTypesAndValues:
            kind = pair.attributeType.strip().lower()
            value = " ".join(pair.value.split()).lower()
            if not kind:
                raise ValueError(f"{text!r} is not a distinguished name")
            pairs.append(distinguishedname.LDAPAttributeTypeAndValue(attributeType=kind, value=value).getText())
        rdns.append("+".join(sorted(pairs)))
    return ",".join(rdns)


def try_normalise_dn(text: str) -> str:
    """:func:`normalise_dn`, or the lower-cased text when it is not a DN (memberOf can hold anything)."""
    try:
        return normalise_dn(text)
    except ValueError:
        return text.strip().lower()


# -- mapping rules ----------------------------------------------------------------------


class MappingError(ValueError):
    """A bad ``group_mapping`` / ``roles_mapping`` line; ``index`` counts the value's lines from 0.

    ``all``: every bad line of the value, this one first (:meth:`GroupMapping.parse` reads on past one);
    ``partial``: the mapping of the good lines, so the IDs they name are checked in the same pass.
    """

    def __init__(
        self, message: str, index: int, others: tuple["MappingError", ...] = (), partial: Optional["GroupMapping"] = None
    ):
        super().__init__(message)
        self.index = index
        self.all = (self, *others)
        self.partial = partial


@attrs.frozen
class MappingRule:
    """``ATTRIBUTE, EXPRESSION, ID[, ID...]``; ``index`` is its line in the option value."""

    attribute: str
    expression: MatchingExpression
    targets: tuple[str, ...]
    index: int
    text: str


@attrs.frozen
class MappingOutcome:
    """The IDs a mapping gave and why (one sentence per rule looked at)."""

    targets: tuple[str, ...]
    rule: Optional[MappingRule]
    matched_value: Optional[str]
    explanation: tuple[str, ...]


@attrs.frozen
class GroupMapping:
    """``group_mapping`` (kind "group") or ``roles_mapping`` (kind "role"), parsed once."""

    kind: str
    fallback: tuple[str, ...] = ()
    fallback_indexes: tuple[int, ...] = ()
    rules: tuple[MappingRule, ...] = ()

    @classmethod
    def parse(cls, text: str, kind: str = "group") -> "GroupMapping":
        fallback: list[str] = []
        fallback_indexes: list[int] = []
        rules: list[MappingRule] = []
        problems: list[MappingError] = []
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        for index, line in enumerate(lines):
            try:
                # roles_mapping = A, B: role IDs on one line (too few items for a rule). Three or more
                # items read as a rule here; with_role_lists() reads them as IDs once the roles are known.
                listed = _id_list(line) if kind == "role" else None
                if "," not in line or (listed is not None and len(listed) < 3):
                    if rules:
                        raise MappingError(
                            f"{line!r}: a bare {kind} ID (the fallback) is only allowed before the first rule", index
                        )
                    for word in listed or [line]:
                        fallback.append(_identifier(word, kind, index))
                        fallback_indexes.append(index)
                    continue
                rules.append(_parse_rule(line, kind, index))
            except MappingError as problem:
                problems.append(problem)  # the lines after it are read too: every mistake in one check
        mapping = cls(kind, tuple(fallback), tuple(fallback_indexes), tuple(rules))
        if problems:
            raise MappingError(str(problems[0]), problems[0].index, tuple(problems[1:]), partial=mapping)
        return mapping

    def with_role_lists(self, known: Iterable[str]) -> "GroupMapping":
        """Leading rule lines whose every item is a defined role ID read as role IDs instead.

        ``roles_mapping = ADMIN, AUDIT, OPS`` parses as the rule "attribute
        ADMIN matches AUDIT gives OPS"; when all three are ``[roles/ID]``
        sections, the administrator meant three roles.
        """
        known = set(known)
        fallback, indexes, rules = list(self.fallback), list(self.fallback_indexes), list(self.rules)
        while rules and (listed := _id_list(rules[0].text)) is not None and known.issuperset(listed):
            fallback.extend(listed)
            indexes.extend([rules[0].index] * len(listed))
            rules.pop(0)
        return attrs.evolve(self, fallback=tuple(fallback), fallback_indexes=tuple(indexes), rules=tuple(rules))

    @property
    def empty(self) -> bool:
        return not self.fallback and not self.rules

    @property
    def attributes(self) -> tuple[str, ...]:
        """The entry attributes the rules read (as first written)."""
        return tuple(dict.fromkeys(rule.attribute for rule in self.rules))

    def targets_with_indexes(self) -> Iterable[tuple[str, int]]:
        """Every ID named, with its line index, for the cross-check of unknown IDs."""
        yield from zip(self.fallback, self.fallback_indexes)
        for rule in self.rules:
            for target in rule.targets:
                yield target, rule.index

    def resolve(self, values_of: Callable[[str], Sequence[str]]) -> MappingOutcome:
        """First rule with a matching value wins; else the fallback; else nothing."""
        explanation = []
        for number, rule in enumerate(self.rules, start=1):
            values = tuple(values_of(rule.attribute))
            matched = rule.expression.first_match(values)
            if matched is not None:
                explanation.append(
                    f"rule {number} '{rule.text}' matched: {rule.attribute} value {matched!r} "
                    f"matches {rule.expression.text} -> {', '.join(rule.targets)}"
                )
                return MappingOutcome(rule.targets, rule, matched, tuple(explanation))
            explanation.append(f"rule {number} '{rule.text}' did not match: {rule.attribute} {_shown(values)}")
        if self.fallback:
            explanation.append(f"no rule matched: fallback {self.kind} {', '.join(self.fallback)}")
            return MappingOutcome(self.fallback, None, None, tuple(explanation))
        if self.rules:
            explanation.append("no rule matched and there is no fallback")
        return MappingOutcome((), None, None, tuple(explanation))


def _shown(values: Sequence[str]) -> str:
    if not values:
        return "has no value"
    shown = ", ".join(repr(value) for value in values[:_SHOWN_VALUES])
    more = f" and {len(values) - _SHOWN_VALUES} more" if len(values) > _SHOWN_VALUES else ""
    return f"values {shown}{more}"


def _id_list(line: str) -> Optional[list[str]]:
    """The comma-separated items of a line when each could be an ID (no expression syntax), else None."""
    items = [item.strip() for item in line.split(",")]
    if not all(items) or any(char in line for char in _IDENTIFIER_FORBIDDEN):
        return None
    return items


def _identifier(text: str, kind: str, index: int) -> str:
    word = text.strip()
    if not word or any(char in word for char in _IDENTIFIER_FORBIDDEN):
        raise MappingError(f"{word!r} is not a {kind} ID; an ID is any non-empty text without '/' or '|'", index)
    return word


def _parse_rule(line: str, kind: str, index: int) -> MappingRule:
    usage = f"expected 'ATTRIBUTE, EXPRESSION, {kind.upper()}-ID[, {kind.upper()}-ID...]'"
    attribute, _, rest = line.partition(",")
    attribute = attribute.strip()
    if not ATTRIBUTE.match(attribute):
        raise MappingError(f"{line!r}: {attribute!r} is not an LDAP attribute name; {usage}", index)
    typed = _TYPED_EXPRESSION.match(rest)
    if typed is not None:
        # IDs cannot hold '/', so the expression runs to the last '/' (plus modifiers).
        expression_text, ids_text = typed.group(1), typed.group(2) or ""
    else:
        expression_text, _, ids_text = rest.partition(",")
        expression_text = expression_text.strip()
        if _RDN.match(expression_text):
            # An exact DN written bare (cn=ftp,ou=groups,dc=example): its other RDNs are part
            # of the expression, not IDs; the IDs start at the first item that is no RDN.
            items = ids_text.split(",")
            while items and _RDN.match(items[0].strip()):
                expression_text += "," + items.pop(0).strip()
            ids_text = ",".join(items)
    targets = [item.strip() for item in ids_text.split(",")]
    if not expression_text or not ids_text.strip():
        hint = "a glob with a comma is written g/.../; a fallback is one ID per line"
        raise MappingError(f"{line!r}: {usage} ({hint})", index)
    try:
        expression = compile_expression(expression_text)
    except InvalidExpression as error:
        raise MappingError(f"{line!r}: {error}", index) from None
    return MappingRule(
        attribute, expression, tuple(_identifier(item, kind, index) for item in targets), index, " ".join(line.split())
    )


# -- group search filters -----------------------------------------------------------------


class InvalidTemplate(ValueError):
    pass


@attrs.frozen
class FilterTemplate:
    """A configured filter with ``{username}`` / ``{dn}`` placeholders, parsed once."""

    text: str
    placeholders: frozenset[str]
    _parsed: pureldap.LDAPFilter = attrs.field(repr=False, eq=False)

    @classmethod
    def parse(cls, text: str) -> Optional["FilterTemplate"]:
        text = text.strip()
        if not text:
            return None
        if "sftpauthplaceholder" in text.lower():
            raise InvalidTemplate(f"{text!r} holds a reserved word")
        used = set()

        def sentinel(match: re.Match) -> str:
            name = match.group(1)
            if name not in PLACEHOLDERS:
                allowed = ", ".join("{" + placeholder + "}" for placeholder in PLACEHOLDERS)
                raise InvalidTemplate(f"{text!r}: unknown placeholder {{{name}}}; allowed: {allowed}")
            used.add(name)
            return _SENTINEL.format(name)

        source = re.sub(r"\{([^{}]*)\}", sentinel, text)
        if not source.startswith("("):
            source = f"({source})"
        try:
            parsed = ldapfilter.parseFilter(source)
        except Exception as error:
            raise InvalidTemplate(f"{text!r} is not a valid LDAP filter (RFC 4515): {error}") from None
        for name in _attribute_names(parsed):
            if "sftpauthplaceholder" in name.lower():
                raise InvalidTemplate(f"{text!r}: placeholders are only allowed in values, not in attribute names")
        return cls(text, frozenset(used), parsed)

    @property
    def in_chain(self) -> bool:
        """True when the filter uses Active Directory's in-chain rule (the directory resolves nesting)."""
        return any(rule == IN_CHAIN_RULE for rule in _matching_rules(self._parsed))

    def build(self, **values: str) -> pureldap.LDAPFilter:
        """The filter with each placeholder replaced by its value, as an assertion value."""
        missing = self.placeholders - set(values)
        if missing:
            raise KeyError(f"no value for {', '.join(sorted(missing))}")
        built = copy.deepcopy(self._parsed)
        replacements = {_SENTINEL.format(name): value for name, value in values.items()}
        _substitute(built, replacements)
        return built


def _children(node) -> list:
    if isinstance(node, (pureldap.LDAPFilter_and, pureldap.LDAPFilter_or)):
        return list(node)
    if isinstance(node, pureldap.LDAPFilter_not):
        return [node.value]
    return []


def _attribute_names(node) -> Iterable[str]:
    for child in _children(node):
        yield from _attribute_names(child)
    if isinstance(node, pureldap.LDAPFilter_substrings):
        yield str(node.type)
    elif isinstance(node, pureldap.LDAPFilter_present):
        yield str(node.value)
    elif isinstance(node, pureldap.LDAPFilter_extensibleMatch):
        if node.type is not None:
            yield str(node.type.value)
        if node.matchingRule is not None:
            yield str(node.matchingRule.value)
    elif hasattr(node, "attributeDesc"):
        yield str(node.attributeDesc.value)


def _matching_rules(node) -> Iterable[str]:
    for child in _children(node):
        yield from _matching_rules(child)
    if isinstance(node, pureldap.LDAPFilter_extensibleMatch) and node.matchingRule is not None:
        yield str(node.matchingRule.value)


def _replace(text, replacements: Mapping[str, str]):
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    for sentinel, value in replacements.items():
        text = text.replace(sentinel, value)
    return text


def _substitute(node, replacements: Mapping[str, str]) -> None:
    for child in _children(node):
        _substitute(child, replacements)
    if isinstance(node, pureldap.LDAPFilter_substrings):
        for part in node.substrings:
            part.value = _replace(part.value, replacements)
    elif isinstance(node, pureldap.LDAPFilter_extensibleMatch):
        node.matchValue.value = _replace(node.matchValue.value, replacements)
    elif hasattr(node, "assertionValue"):
        node.assertionValue.value = _replace(node.assertionValue.value, replacements)


def any_of(filters: Sequence[pureldap.LDAPFilter]) -> pureldap.LDAPFilter:
    return filters[0] if len(filters) == 1 else pureldap.LDAPFilter_or(list(filters))


DEFAULT_PARENT_FILTER = FilterTemplate.parse("(member={dn})")
# Every group that holds {dn}, directly or through other groups, in one search (Active Directory)
IN_CHAIN_FILTER = FilterTemplate.parse(f"(member:{IN_CHAIN_RULE}:={{dn}})")


# -- resolution at login --------------------------------------------------------------------


@attrs.frozen
class Resolution:
    """The final IDs (first = primary for groups) and the sentences that explain them."""

    ids: tuple[str, ...]
    explanation: tuple[str, ...]


class GroupResolver:
    """Groups and roles of one LDAP method; built once, used for every login."""

    def __init__(self, settings: LDAPAuthenticationSettings, configuration: Configuration):
        self.settings = settings
        self.group_mapping: GroupMapping = settings.group_mapping or GroupMapping("group")
        self.roles_mapping: GroupMapping = settings.roles_mapping or GroupMapping("role")
        self.base_groups: tuple[str, ...] = tuple(settings.base_groups)
        self.associations: tuple[tuple[str, frozenset[str]], ...] = tuple(
            (group_id, frozenset(group.external_groups_association))
            for group_id, group in configuration.groups.items()
            if group.external_groups_association
        )
        self.search_base: str = settings.group_search_base
        self.search_filter: Optional[FilterTemplate] = settings.group_search_filter
        self.nested: bool = settings.nested_groups
        template = self.search_filter
        if template is not None and template.placeholders == frozenset({"dn"}):
            self.parent_filter = template
        else:
            self.parent_filter = DEFAULT_PARENT_FILTER
        # server address -> whether its root DSE says Active Directory (asked once per server)
        self._active_directory: dict[object, bool] = {}

    @property
    def attributes(self) -> tuple[str, ...]:
        """Entry attributes the mappings need (memberOf is always read)."""
        return tuple(dict.fromkeys(self.group_mapping.attributes + self.roles_mapping.attributes))

    def needs_membership(self, manager: bool) -> bool:
        """Whether the memberOf list matters for this kind of login (else no group search is made)."""
        mapping = self.roles_mapping if manager else self.group_mapping
        uses_member_of = any(rule.attribute.lower() == MEMBER_OF for rule in mapping.rules)
        return uses_member_of or (not manager and bool(self.associations))

    # -- membership ----------------------------------------------------------------------

    async def member_of(
        self, connection: LDAPConnection, lookup: Lookup, entry: Entry, manager: bool = False
    ) -> tuple[str, ...]:
        """The entry's memberOf values, plus searched groups and their parents."""
        values = {try_normalise_dn(value): value for value in entry.get("memberOf")}
        searching = self.search_filter is not None or self.nested
        if not searching:
            return tuple(values.values())
        if not self.needs_membership(manager):
            why = "no mapping rule reads memberOf and no group has external_groups_association"
            lookup.trace("groups", f"group search skipped: {why}")
            return tuple(values.values())
        if self.settings.service_account_dn:
            await bind_service_account(connection, lookup)

        async def search(filter_object, what: str) -> list[str]:
            result, entries = await connection.search(self.search_base, SUBTREE, filter_object, ())
            found = [found_entry.dn for found_entry in entries]
            lookup.trace(
                "groups",
                f"{what}: search {as_text(filter_object)} under {self.search_base}: "
                + (f"{len(found)} group(s)" + (f": {'; '.join(found)}" if found else "")),
            )
            trace_referrals(lookup, "groups", result)
            if not result.ok:
                raise LoginFailed(
                    "group-search-failed", f"group search under {self.search_base}: {describe(result)}"
                )
            return found

        if self.search_filter is not None:
            username = _first(entry.get(self.settings.username_attribute)) or lookup.username
            filter_object = self.search_filter.build(username=username, dn=entry.dn)
            for dn in await search(filter_object, "group search"):
                values.setdefault(try_normalise_dn(dn), dn)
        if self.nested:
            if self.search_filter is not None and self.search_filter.in_chain:
                lookup.trace("groups", f"nested groups: resolved by the directory ({IN_CHAIN_RULE} in the filter)")
            elif await self._is_active_directory(connection, lookup):
                for dn in await search(IN_CHAIN_FILTER.build(dn=entry.dn), "nested groups, Active Directory in-chain rule"):
                    values.setdefault(try_normalise_dn(dn), dn)
            else:
                await self._walk_parents(values, search, lookup)
        return tuple(values.values())

    async def _is_active_directory(self, connection: LDAPConnection, lookup: Lookup) -> bool:
        """Whether the server resolves nested groups itself: its root DSE names AD's capability."""
        server = getattr(connection, "server", None)
        if server not in self._active_directory:
            capabilities = await root_dse_values(connection, "supportedCapabilities")
            self._active_directory[server] = ACTIVE_DIRECTORY_CAPABILITY in capabilities
        if self._active_directory[server]:
            lookup.trace("groups", f"nested groups: the server is Active Directory ({ACTIVE_DIRECTORY_CAPABILITY}): one in-chain search")
        return self._active_directory[server]

    async def _walk_parents(self, values: dict[str, str], search, lookup) -> None:
        """Parents of parents, one search per level with an OR of that level's DNs."""
        level = {key: dn for key, dn in values.items() if _is_dn(dn)}  # memberOf may hold plain names
        for depth in range(1, MAX_NESTING + 1):
            if not level:
                return
            filters = [self.parent_filter.build(dn=dn) for dn in level.values()]
            found = await search(any_of(filters), f"nested groups, level {depth}")
            level = {}
            for dn in found:
                key = try_normalise_dn(dn)
                if key not in values:
                    values[key] = dn
                    level[key] = dn
        if level:
            lookup.trace("groups", f"nested groups: stopped after {MAX_NESTING} levels; deeper parents are ignored")

    # -- groups and roles ------------------------------------------------------------------

    def groups(self, entry: Entry, member_of: Sequence[str]) -> Resolution:
        """base_groups, then the mapped groups, then external associations; DEFAULT_GROUP when none."""
        explanation: list[str] = []
        ids: list[str] = []
        if self.base_groups:
            ids.extend(self.base_groups)
            explanation.append(f"base_groups: {', '.join(self.base_groups)}")
        if not self.group_mapping.empty:
            outcome = self.group_mapping.resolve(_values_of(entry, member_of))
            explanation.extend(f"group_mapping {line}" for line in outcome.explanation)
            ids.extend(outcome.targets)
        normalised = {try_normalise_dn(value) for value in member_of}
        for group_id, dns in self.associations:
            common = dns & normalised
            if common:
                ids.append(group_id)
                explanation.append(
                    f"external_groups_association of [groups/{group_id}] lists {sorted(common)[0]} (a memberOf value)"
                )
        ids = list(dict.fromkeys(ids))
        if not ids:
            ids = [DEFAULT_GROUP]
            explanation.append(f"nothing applies: {DEFAULT_GROUP}")
        explanation.append(f"groups: {', '.join(ids)} (primary: {ids[0]})")
        return Resolution(tuple(ids), tuple(explanation))

    def roles(self, entry: Entry, member_of: Sequence[str]) -> Resolution:
        """The roles_mapping result, or DEFAULT-ROLE."""
        explanation: list[str] = []
        outcome = self.roles_mapping.resolve(_values_of(entry, member_of))
        explanation.extend(f"roles_mapping {line}" for line in outcome.explanation)
        ids = list(dict.fromkeys(outcome.targets)) or [DEFAULT_ROLE]
        if not outcome.targets:
            explanation.append(f"no role mapped: {DEFAULT_ROLE}")
        explanation.append(f"roles: {', '.join(ids)}")
        return Resolution(tuple(ids), tuple(explanation))


def _values_of(entry, member_of: Sequence[str]) -> Callable[[str], Sequence[str]]:
    def values_of(attribute: str) -> Sequence[str]:
        if attribute.lower() == MEMBER_OF:
            return tuple(member_of)
        return entry.get(attribute)

    return values_of


def _is_dn(text: str) -> bool:
    try:
        normalise_dn(text)
    except ValueError:
        return False
    return "=" in text


def _first(values: Sequence[str]) -> str:
    return values[0] if values else ""
