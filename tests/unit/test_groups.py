"""Groups and roles of LDAP accounts: mapping rules, group search, nesting, associations (SPEC §3)."""

from __future__ import annotations

import textwrap

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from sftpauth.auth.credentials import LoginRequest
from sftpauth.auth.errors import LoginFailed
from sftpauth.auth.ldap import client as ldap
from sftpauth.auth.ldap.client import Entry, LDAPResult
from sftpauth.auth.ldap.groups import (
    ACTIVE_DIRECTORY_CAPABILITY,
    MAX_NESTING,
    FilterTemplate,
    GroupMapping,
    GroupResolver,
    InvalidTemplate,
    MappingError,
    normalise_dn,
)
from sftpauth.auth.ldap.method import LDAPMethod
from sftpauth.auth.trace import Trace
from sftpauth.config import models
from sftpauth.config.errors import ConfigError
from sftpauth.config.loader import parse_configuration
from sftpauth.permissions import FULL_CONTROL, Permission

PATH = "/etc/sftpauth/server.ini"
BASE = "dc=example,dc=com"
PEOPLE = f"ou=people,{BASE}"
GROUPS = f"ou=groups,{BASE}"
BOB_DN = f"cn=bob,{PEOPLE}"

SEED_GROUPS = """
[groups/987d-54da-db3c]
home_folder_path = /srv/fallback
permissions = allow-read

[groups/54ae-987d-09ff]
home_folder_path = /srv/apac
permissions = allow-read, allow-list, allow-write

[groups/987d-88de-4213]
home_folder_path = /srv/second

[groups/8fde-54da-00aa]
home_folder_path = /srv/sales

[groups/5b9f-2600-ebd6]
home_folder_path = /srv/it
permissions = deny-full-control
"""

SEED_MAPPING = """
group_mapping =
    987d-54da-db3c
    memberOf, *-apac-*, 54ae-987d-09ff, 987d-88de-4213, 8fde-54da-00aa
    memberOf, *-it-*, 5b9f-2600-ebd6
    operationalUnit, m/sales-force-[1-3]/, 8fde-54da-00aa
"""

BOB = Entry(
    BOB_DN,
    {
        "cn": ("bob",),
        "memberof": ("sales-apac-oceania", "syadmin"),
        "operationalunit": ("sales-force-2",),
    },
)


def configuration(ldap_options: str = "", extra: str = "") -> models.Configuration:
    text = textwrap.dedent(
        f"""
        [server]
        authentications = directory

        [authentications/directory]
        type = ldap
        address = 127.0.0.1
        bind_dn = {PEOPLE}
        """
    )
    text += textwrap.dedent(ldap_options) + textwrap.dedent(extra)
    return parse_configuration(text, PATH, "/etc/sftpauth", {})


def problems(ldap_options: str = "", extra: str = "") -> list:
    with pytest.raises(ConfigError) as caught:
        configuration(ldap_options, extra)
    return list(caught.value.problems)


def resolver(ldap_options: str = "", extra: str = "") -> GroupResolver:
    loaded = configuration(ldap_options, extra)
    return GroupResolver(loaded.authentications["directory"], loaded)


# -- the seed example and the mapping semantics -------------------------------------------


def test_seed_example_gives_the_documented_groups():
    """bob (memberOf sales-apac-oceania) gets 54ae-987d-09ff as primary, then 987d-88de-4213 and 8fde-54da-00aa."""
    resolution = resolver(SEED_MAPPING, SEED_GROUPS).groups(BOB, BOB.get("memberOf"))
    assert resolution.ids == ("54ae-987d-09ff", "987d-88de-4213", "8fde-54da-00aa")
    explanation = "\n".join(resolution.explanation)
    assert "rule 1 'memberOf, *-apac-*, 54ae-987d-09ff, 987d-88de-4213, 8fde-54da-00aa' matched" in explanation
    assert "'sales-apac-oceania'" in explanation
    assert "primary: 54ae-987d-09ff" in explanation


def test_seed_example_first_match_wins_over_later_rules():
    """An account matching rule 2 and rule 3 only gets rule 2's group."""
    entry = Entry(BOB_DN, {"memberof": ("ops-it-london",), "operationalunit": ("sales-force-1",)})
    assert resolver(SEED_MAPPING, SEED_GROUPS).groups(entry, entry.get("memberOf")).ids == ("5b9f-2600-ebd6",)


def test_seed_example_regex_rule_on_another_attribute():
    """Without a matching memberOf, the operationalUnit regex rule applies (search semantics)."""
    entry = Entry(BOB_DN, {"memberof": ("hr",), "operationalunit": ("emea-sales-force-3",)})
    resolution = resolver(SEED_MAPPING, SEED_GROUPS).groups(entry, entry.get("memberOf"))
    assert resolution.ids == ("8fde-54da-00aa",)
    assert "rule 3" in resolution.explanation[-2]


def test_seed_example_fallback_when_no_rule_matches():
    """The bare first line is the group of accounts no rule matches."""
    entry = Entry(BOB_DN, {"memberof": ("hr",), "operationalunit": ("sales-force-9",)})
    resolution = resolver(SEED_MAPPING, SEED_GROUPS).groups(entry, entry.get("memberOf"))
    assert resolution.ids == ("987d-54da-db3c",)
    assert any("no rule matched: fallback group 987d-54da-db3c" in line for line in resolution.explanation)


def test_default_group_when_nothing_applies():
    """No base group, no match, no fallback and no association: DEFAULT_GROUP."""
    options = """
    group_mapping =
        memberOf, *-apac-*, 54ae-987d-09ff
    """
    entry = Entry(BOB_DN, {"memberof": ("hr",)})
    resolution = resolver(options, SEED_GROUPS).groups(entry, entry.get("memberOf"))
    assert resolution.ids == (models.DEFAULT_GROUP,)
    assert "nothing applies: DEFAULT_GROUP" in resolution.explanation


def test_no_mapping_and_no_base_groups_is_default_group():
    """An LDAP method without any group option gives DEFAULT_GROUP, as before."""
    assert resolver().groups(BOB, ()).ids == (models.DEFAULT_GROUP,)


def test_base_groups_come_first_and_mapped_groups_after():
    """base_groups are for every account and the first of them stays primary; duplicates are dropped."""
    options = SEED_MAPPING + "base_groups = 987d-88de-4213, 5b9f-2600-ebd6\n"
    resolution = resolver(options, SEED_GROUPS).groups(BOB, BOB.get("memberOf"))
    assert resolution.ids == ("987d-88de-4213", "5b9f-2600-ebd6", "54ae-987d-09ff", "8fde-54da-00aa")


def test_attribute_names_are_case_insensitive():
    """A rule on MEMBEROF or OperationalUNIT reads memberOf / operationalUnit."""
    options = """
    group_mapping =
        OPERATIONALUNIT, sales-force-2, 8fde-54da-00aa
    """
    assert resolver(options, SEED_GROUPS).groups(BOB, BOB.get("memberOf")).ids == ("8fde-54da-00aa",)
    options = """
    group_mapping =
        MEMBEROF, syadmin, 5b9f-2600-ebd6
    """
    assert resolver(options, SEED_GROUPS).groups(BOB, BOB.get("memberOf")).ids == ("5b9f-2600-ebd6",)


def test_any_value_of_a_multi_valued_attribute_matches():
    """The rule matches on the second memberOf value when the first does not."""
    options = """
    group_mapping =
        memberOf, sya*, 5b9f-2600-ebd6
    """
    resolution = resolver(options, SEED_GROUPS).groups(BOB, BOB.get("memberOf"))
    assert resolution.ids == ("5b9f-2600-ebd6",)
    assert "value 'syadmin'" in resolution.explanation[0]


def test_negated_expressions_need_a_value():
    """A negated rule matches a value that fails the expression, and an entry without the attribute matches nothing."""
    options = """
    group_mapping =
        memberOf, e/^admins$/, 987d-88de-4213
    """
    entry = Entry(BOB_DN, {"memberof": ("users",)})
    assert resolver(options, SEED_GROUPS).groups(entry, entry.get("memberOf")).ids == ("987d-88de-4213",)
    empty = Entry(BOB_DN, {})
    assert resolver(options, SEED_GROUPS).groups(empty, ()).ids == (models.DEFAULT_GROUP,)


def test_a_glob_with_commas_is_written_g_slash():
    """An exact group DN (with commas) is matched with g/DN/ against the memberOf values."""
    options = f"""
    group_mapping =
        memberOf, g/cn=ftp-admins,{GROUPS}/, 54ae-987d-09ff
        memberOf, m/^cn=ftp-[a-z]+,/i, 987d-88de-4213
    """
    admin = Entry(BOB_DN, {"memberof": (f"CN=FTP-Admins,OU=Groups,{BASE}",)})
    user = Entry(BOB_DN, {"memberof": (f"cn=ftp-users,{GROUPS}",)})
    mapping = resolver(options, SEED_GROUPS)
    assert mapping.groups(admin, admin.get("memberOf")).ids == ("54ae-987d-09ff",)
    assert mapping.groups(user, user.get("memberOf")).ids == ("987d-88de-4213",)


def test_non_matching_rules_are_explained_with_their_values():
    """Each rule tried says which values it saw, so test-login shows why it did not match."""
    entry = Entry(BOB_DN, {"memberof": ("hr",), "operationalunit": ("sales-force-9",)})
    resolution = resolver(SEED_MAPPING, SEED_GROUPS).groups(entry, entry.get("memberOf"))
    rule = "'memberOf, *-apac-*, 54ae-987d-09ff, 987d-88de-4213, 8fde-54da-00aa'"
    assert f"group_mapping rule 1 {rule} did not match: memberOf values 'hr'" in resolution.explanation
    assert any("operationalUnit values 'sales-force-9'" in line for line in resolution.explanation)


# -- configuration errors -------------------------------------------------------------------


def test_unknown_group_ids_are_errors_on_their_own_lines():
    """Every unknown group ID of group_mapping is an error naming the line of its rule."""
    text = textwrap.dedent(
        """
        [authentications/directory]
        type = ldap
        address = 127.0.0.1
        bind_dn = dc=example,dc=com
        group_mapping =
            DEFAULT_GROUP
            memberOf, *-apac-*, DEFAULT_GROUP, no-such-group
            memberOf, *-it-*, other-missing
        """
    )
    with pytest.raises(ConfigError) as caught:
        parse_configuration(text, PATH, "/etc", {})
    found = [(p.line, p.option, p.message) for p in caught.value.problems]
    assert (8, "group_mapping", "unknown group 'no-such-group'; defined: DEFAULT_GROUP") in found
    assert (9, "group_mapping", "unknown group 'other-missing'; defined: DEFAULT_GROUP") in found
    assert len(found) == 2


def test_unknown_fallback_group_is_an_error():
    """The legacy fallback line must name a defined group too."""
    found = problems("group_mapping = missing-fallback\n")
    assert [(p.option, p.message) for p in found] == [
        ("group_mapping", "unknown group 'missing-fallback'; defined: DEFAULT_GROUP")
    ]


@pytest.mark.parametrize(
    "rule, fragment",
    [
        ("memberOf, m/[/, DEFAULT_GROUP", "not a valid regular expression"),
        ("memberOf, [a-, DEFAULT_GROUP", "never closed"),
        ("memberOf, x/y/, DEFAULT_GROUP", "unknown matching method"),
        ("memberOf, m/a/q, DEFAULT_GROUP", "unknown modifier"),
        ("memberOf, *-apac-*", "expected 'ATTRIBUTE, EXPRESSION, GROUP-ID"),
        ("memberOf, m/x/", "expected 'ATTRIBUTE, EXPRESSION, GROUP-ID"),
        ("member Of, x, DEFAULT_GROUP", "not an LDAP attribute name"),
        ("memberOf, x, a/b", "not a group ID"),
        ("memberOf, x, DEFAULT_GROUP,", "not a group ID"),
    ],
)
def test_bad_rules_are_errors_naming_their_line(rule, fragment):
    """A bad expression or rule is a configuration error on the rule's own line (line 8 here)."""
    text = textwrap.dedent(
        f"""
        [authentications/directory]
        type = ldap
        address = 127.0.0.1
        bind_dn = dc=example,dc=com
        group_mapping =
            memberOf, ok, DEFAULT_GROUP
            {rule}
        """
    )
    with pytest.raises(ConfigError) as caught:
        parse_configuration(text, PATH, "/etc", {})
    (problem,) = caught.value.problems
    assert (problem.line, problem.section, problem.option) == (8, "authentications/directory", "group_mapping")
    assert fragment in problem.message
    assert str(problem).startswith(f"{PATH}:8 [authentications/directory] group_mapping: ")


def test_bad_expression_on_the_option_line_names_that_line():
    """A one-line group_mapping with a bad rule is reported on the option's line."""
    found = problems("group_mapping = memberOf, m/(/, DEFAULT_GROUP\n")
    assert len(found) == 1 and found[0].line == 9 and "not a valid regular expression" in found[0].message


def test_a_bare_dn_expression_keeps_its_commas():
    """SPEC: an exact value is a glob without wildcards; a DN written bare is one expression, then the IDs."""
    mapping = GroupMapping.parse("memberOf, cn=ftp-users,ou=groups,dc=demo,dc=example, staff, admins")
    [rule] = mapping.rules
    assert rule.expression.text == "cn=ftp-users,ou=groups,dc=demo,dc=example"
    assert rule.targets == ("staff", "admins")
    assert mapping.resolve(lambda name: ("CN=ftp-users,OU=groups,DC=demo,DC=example",)).targets == ("staff", "admins")
    assert mapping.resolve(lambda name: ("cn=ftp-users,ou=other,dc=demo,dc=example",)).targets == ()


def test_a_bare_dn_without_an_id_is_still_an_error():
    with pytest.raises(MappingError) as caught:
        GroupMapping.parse("memberOf, cn=ftp-users,ou=groups,dc=demo")
    assert "GROUP-ID" in str(caught.value)


def test_bare_id_after_a_rule_is_an_error():
    """The fallback is only allowed before the first rule."""
    with pytest.raises(MappingError) as caught:
        GroupMapping.parse("memberOf, x, a\nfallback")
    assert caught.value.index == 1
    assert "only allowed before the first rule" in str(caught.value)


def test_roles_mapping_needs_defined_roles():
    """roles_mapping IDs are [roles/ID] sections; DEFAULT-ROLE always exists."""
    found = problems(
        """
        roles_mapping =
            memberOf, *admins*, auditors
            memberOf, *ops*, DEFAULT-ROLE
        """
    )
    assert [(p.line, p.option, p.message) for p in found] == [
        (11, "roles_mapping", "unknown role 'auditors'; defined: DEFAULT-ROLE")
    ]


ROLE_SECTIONS = "\n[roles/auditors]\npermissions = configuration, read\n[roles/operators]\n[roles/ops]\n"


@pytest.mark.parametrize(
    "line",
    ["auditors, operators", "auditors, operators, ops", "auditors,operators,ops,DEFAULT-ROLE"],
)
def test_roles_mapping_takes_role_ids_on_one_line(line):
    """SPEC: roles_mapping is "role ID(s), or rules": ``A, B`` (and ``A, B, C`` of defined roles) are role IDs."""
    mapping = configuration(f"roles_mapping = {line}\n", ROLE_SECTIONS).authentications["directory"].roles_mapping
    assert mapping.fallback == tuple(item.strip() for item in line.split(","))
    assert mapping.rules == ()


def test_manager_login_gets_every_role_listed_on_one_line():
    """Through the LDAP method: a manager login gets each role of the one-line list."""
    extra = ROLE_SECTIONS
    method = method_for("manager_search_filter = (objectClass=*)\nroles_mapping = auditors, ops\n", extra, bob_directory())
    account = run(method.authenticate(LoginRequest("bob", "bob-pass", "manager", "manager", "", manager=True)))
    assert account.roles == ("auditors", "ops")


def test_three_items_that_are_not_all_roles_stay_a_rule():
    """``memberOf, *admins*, operators`` is a rule even though operators is a role."""
    mapping = configuration("roles_mapping = memberOf, *admins*, operators\n", ROLE_SECTIONS).authentications[
        "directory"
    ].roles_mapping
    assert mapping.fallback == ()
    assert [(rule.attribute, rule.targets) for rule in mapping.rules] == [("memberOf", ("operators",))]


def test_role_ids_on_one_line_then_rules():
    """Role IDs on the first line are the fallback; the rules below still apply first."""
    mapping = configuration(
        "roles_mapping =\n    auditors, ops\n    memberOf, sya*, operators\n", ROLE_SECTIONS
    ).authentications["directory"].roles_mapping
    assert mapping.fallback == ("auditors", "ops")
    assert mapping.resolve(lambda name: ("syadmin",)).targets == ("operators",)
    assert mapping.resolve(lambda name: ()).targets == ("auditors", "ops")


def test_two_items_naming_an_unknown_role_hint_at_the_rule_form():
    """``memberOf, admins`` (a rule missing its role) is refused, and the error shows the rule form."""
    found = problems("roles_mapping = memberOf, auditors\n", ROLE_SECTIONS)
    assert [(p.option, p.message) for p in found] == [
        (
            "roles_mapping",
            "unknown role 'memberOf'; defined: DEFAULT-ROLE, auditors, operators, ops"
            " (a rule is 'ATTRIBUTE, EXPRESSION, ROLE-ID')",
        )
    ]


def test_group_mapping_keeps_one_fallback_id_per_line():
    """group_mapping is unchanged: ``a, b`` is a broken rule, not two groups."""
    with pytest.raises(MappingError):
        GroupMapping.parse("staff, admins", "group")


def test_roles_sections_and_default_role():
    """[roles/ID] permissions: empty or all is full control, configuration/read is read-only; DEFAULT-ROLE is implicit."""
    loaded = configuration(
        "roles_mapping = memberOf, *auditors*, auditors\n",
        """
        [roles/auditors]
        name = Auditors
        permissions = configuration, read

        [roles/operators]
        """,
    )
    assert set(loaded.roles) == {"auditors", "operators", models.DEFAULT_ROLE}
    assert loaded.roles["auditors"].permissions == frozenset({"configuration", "read"})
    assert loaded.roles["auditors"].read_only is True
    assert loaded.roles["operators"].permissions == frozenset({"all"})
    assert loaded.roles[models.DEFAULT_ROLE].read_only is False


def test_bad_role_permission_is_an_error():
    """An unknown word in a role's permissions names what is allowed."""
    found = problems("", "\n[roles/r]\npermissions = configuration, delete-everything\n")
    assert found[0].section == "roles/r" and "allowed: all, configuration, read, write" in found[0].message


@pytest.mark.parametrize(
    "options, option, fragment",
    [
        ("group_search_filter = (member={dn})\n", "group_search_base", "required when group_search_filter is set"),
        ("nested_groups = yes\n", "group_search_base", "required when nested_groups = yes"),
        (f"group_search_base = {GROUPS}\n", "group_search_filter", "required when group_search_base is set"),
        (f"group_search_base = {GROUPS}\ngroup_search_filter = (member={{user}})\n", "group_search_filter", "unknown placeholder {user}"),
        (f"group_search_base = {GROUPS}\ngroup_search_filter = ({{username}}=x)\n", "group_search_filter", "only allowed in values"),
        (f"group_search_base = {GROUPS}\ngroup_search_filter = (member={{dn}}\n", "group_search_filter", "not a valid LDAP filter"),
        ("group_search_base = not a dn\ngroup_search_filter = (member={dn})\n", "group_search_base", "not a distinguished name"),
    ],
)
def test_group_search_options_are_checked(options, option, fragment):
    """Group search needs a base and a filter with known placeholders in values only."""
    found = problems(options)
    assert any(p.option == option and fragment in p.message for p in found), found


def test_external_groups_association_is_normalised_at_load():
    """The configured DNs are kept in one canonical lower-case form; a bad DN is an error on its line."""
    loaded = configuration(
        "",
        """
        [groups/partners]
        external_groups_association =
            CN=Partners , OU=Groups,DC=Example,DC=com
            cn=M\\C3\\BCller\\2C J\\C3\\BCrgen,ou=groups,dc=example,dc=com
        """,
    )
    assert loaded.groups["partners"].external_groups_association == (
        "cn=partners,ou=groups,dc=example,dc=com",
        "cn=müller\\, jürgen,ou=groups,dc=example,dc=com",
    )
    found = problems("", "\n[groups/partners]\nexternal_groups_association =\n    cn=ok,dc=x\n    =broken\n")
    assert found[0].option == "external_groups_association" and found[0].line == 13


# -- DNs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "first, second",
    [
        ("cn=ftp,ou=groups,dc=example,dc=com", "CN=FTP,OU=Groups,DC=Example,DC=COM"),
        ("cn=ftp,ou=groups,dc=example,dc=com", "cn=ftp, ou=groups, dc=example, dc=com"),
        ("cn=ftp  users,dc=x", "cn=FTP users,dc=x"),
        (r"cn=Müller\, Jürgen,dc=x", r"cn=M\C3\BCller\2C J\C3\BCrgen,dc=x"),
        ("cn=a+uid=b,dc=x", "UID=B+CN=A,dc=x"),
    ],
)
def test_normalised_dns_compare_equal(first, second):
    """Case, insignificant spaces, hex escapes and AVA order do not make two DNs differ."""
    assert normalise_dn(first) == normalise_dn(second)


def test_different_dns_stay_different():
    """A different value or an extra RDN is a different group."""
    assert normalise_dn("cn=ftp,dc=x") != normalise_dn("cn=ftp2,dc=x")
    assert normalise_dn("cn=ftp,dc=x") != normalise_dn("cn=ftp,ou=y,dc=x")
    assert normalise_dn(r"cn=a\,b,dc=x") != normalise_dn("cn=a,cn=b,dc=x")


# -- external_groups_association -----------------------------------------------------------------


ASSOCIATION_GROUPS = f"""
[groups/partners]
home_folder_path = /srv/partners
permissions = allow-read, allow-list
external_groups_association =
    cn=Partners,{GROUPS}
    cn=Vendors,{GROUPS}

[groups/auditors]
home_folder_path = /srv/audit
external_groups_association = cn=auditors,{GROUPS}
"""


def test_external_association_adds_the_group_case_insensitively():
    """A memberOf value equal (as a DN, any case or spacing) to a listed DN gives that group."""
    entry = Entry(BOB_DN, {"memberof": (f"CN=VENDORS, OU=groups, {BASE}", f"cn=other,{GROUPS}")})
    resolution = resolver("", ASSOCIATION_GROUPS).groups(entry, entry.get("memberOf"))
    assert resolution.ids == ("partners",)
    assert any("external_groups_association of [groups/partners]" in line for line in resolution.explanation)


def test_external_association_comes_after_mapped_groups():
    """The mapping decides the primary group; associated groups are added after it."""
    options = "group_mapping = memberOf, *, DEFAULT_GROUP\n"
    entry = Entry(BOB_DN, {"memberof": (f"cn=auditors,{GROUPS}", f"cn=partners,{GROUPS}")})
    assert resolver(options, ASSOCIATION_GROUPS).groups(entry, entry.get("memberOf")).ids == (
        "DEFAULT_GROUP",
        "partners",
        "auditors",
    )


def test_external_association_needs_an_exact_dn():
    """A DN that only contains a listed one (a child entry) does not count."""
    entry = Entry(BOB_DN, {"memberof": (f"cn=x,cn=partners,{GROUPS}",)})
    assert resolver("", ASSOCIATION_GROUPS).groups(entry, entry.get("memberOf")).ids == (models.DEFAULT_GROUP,)


# -- filter templates -------------------------------------------------------------------------


def test_placeholders_become_escaped_assertion_values():
    """A username full of filter syntax stays one assertion value (RFC 4515 escaped in text)."""
    template = FilterTemplate.parse("(&(objectClass=posixGroup)(memberUid={username}))")
    built = template.build(username="x*)(uid=*")
    assert built.asText() == r"(&(objectClass=posixGroup)(memberUid=x\2a\29\28uid=\2a))"
    (equality,) = [part for part in built if part.attributeDesc.value == "memberUid"]
    assert equality.assertionValue.value == "x*)(uid=*"


def test_template_is_not_changed_by_building():
    """Each build starts from the parsed template, so values never leak between logins."""
    template = FilterTemplate.parse("(member={dn})")
    first = template.build(dn="cn=a,dc=x").asText()
    second = template.build(dn="cn=b,dc=x").asText()
    assert (first, second) == ("(member=cn=a,dc=x)", "(member=cn=b,dc=x)")


def test_placeholders_inside_substrings_and_extensible_match():
    """Placeholders work inside substring and extensible (AD in-chain) filters too."""
    template = FilterTemplate.parse("(|(cn=*{username}*)(member:1.2.840.113556.1.4.1941:={dn}))")
    assert template.in_chain is True
    assert template.placeholders == frozenset({"username", "dn"})
    text = template.build(username="a*b", dn="cn=u,dc=x").asText()
    assert text == r"(|(cn=*a\2ab*)(member:1.2.840.113556.1.4.1941:=cn=u,dc=x))"
    assert FilterTemplate.parse("(member={dn})").in_chain is False


def test_filter_without_parentheses_and_empty_filter():
    """A filter may omit its outer parentheses; an empty one is None."""
    assert FilterTemplate.parse("memberUid={username}").build(username="bob").asText() == "(memberUid=bob)"
    assert FilterTemplate.parse("  ") is None
    with pytest.raises(InvalidTemplate):
        FilterTemplate.parse("(member={dn})(x")


# -- membership: group search and nesting, with an in-memory directory ------------------------------


class FakeConnection:
    """An LDAPConnection stand-in over in-memory entries; it evaluates the filters it is sent."""

    def __init__(self, entries: dict[str, dict[str, tuple[str, ...]]], passwords: dict[str, str] = None, fail=None):
        self.entries = {dn: {k.lower(): v for k, v in attributes.items()} for dn, attributes in entries.items()}
        self.passwords = passwords or {}
        self.fail = fail
        self.searches: list[tuple[str, str]] = []
        self.binds: list[str] = []
        self.bound_as = None
        self.closed = False
        self.capabilities: tuple[str, ...] = ()  # the root DSE's supportedCapabilities
        self.root_dse_reads = 0

    async def bind(self, dn: str, password: str) -> LDAPResult:
        self.binds.append(dn)
        if self.passwords.get(dn) == password:
            return LDAPResult(ldap.SUCCESS, "")
        return LDAPResult(ldap.INVALID_CREDENTIALS, "")

    async def search(self, base, scope, filter_object, attributes, size_limit=0):
        if base == "":
            self.root_dse_reads += 1
            return LDAPResult(ldap.SUCCESS, ""), [Entry("", {"supportedcapabilities": self.capabilities})]
        self.searches.append((base, filter_object.asText()))
        if self.fail is not None:
            return LDAPResult(self.fail, "no such object"), []
        found = []
        for dn, attributes_found in self.entries.items():
            in_scope = normalise_dn(dn) == normalise_dn(base) or normalise_dn(dn).endswith("," + normalise_dn(base))
            if scope == 0:
                in_scope = normalise_dn(dn) == normalise_dn(base)
            if in_scope and _evaluate(filter_object, attributes_found):
                found.append(Entry(dn, dict(attributes_found)))
        return LDAPResult(ldap.SUCCESS, ""), found

    def close(self) -> None:
        self.closed = True


def _evaluate(node, attributes) -> bool:
    from ldaptor.protocols import pureldap

    if isinstance(node, pureldap.LDAPFilter_and):
        return all(_evaluate(child, attributes) for child in node)
    if isinstance(node, pureldap.LDAPFilter_or):
        return any(_evaluate(child, attributes) for child in node)
    if isinstance(node, pureldap.LDAPFilter_not):
        return not _evaluate(node.value, attributes)
    if isinstance(node, pureldap.LDAPFilter_present):
        return node.value.lower() == "objectclass" or node.value.lower() in attributes
    if isinstance(node, pureldap.LDAPFilter_equalityMatch):
        name = node.attributeDesc.value.lower()
        wanted = node.assertionValue.value
        values = attributes.get(name, ())
        if name in ("member", "memberof"):
            return any(normalise_dn(value) == normalise_dn(wanted) for value in values)
        return any(value.lower() == wanted.lower() for value in values)
    raise AssertionError(f"the fake directory cannot evaluate {node.asText()}")


class FakePool:
    def __init__(self, connection: FakeConnection):
        self.connection = connection

    async def connect(self, trace=None, method_id: str = "", for_searches: bool = False, exclude=()):
        return self.connection

    def release(self, connection) -> None:
        connection.close()


class FakeLookup:
    def __init__(self, username: str = "bob"):
        self.username = username
        self.steps: list[tuple[str, str]] = []

    def trace(self, action: str, detail: str) -> None:
        self.steps.append((action, detail))


def run(coroutine):
    results = []
    defer.ensureDeferred(coroutine).addBoth(results.append)
    assert results, "the coroutine did not finish synchronously"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def group(name: str, *members: str, posix: tuple[str, ...] = ()) -> tuple[str, dict]:
    attributes = {"objectClass": ("groupOfNames",), "cn": (name,), "member": members}
    if posix:
        attributes = {"objectClass": ("posixGroup",), "cn": (name,), "memberUid": posix}
    return f"cn={name},{GROUPS}", attributes


def test_group_search_results_count_as_member_of():
    """Group DNs found by group_search_filter join the entry's own memberOf values, without duplicates."""
    options = f"""
    group_search_base = {GROUPS}
    group_search_filter = (&(objectClass=posixGroup)(memberUid={{username}}))
    group_mapping = memberOf, g/cn=posix-ftp,{GROUPS}/, 54ae-987d-09ff
    """
    connection = FakeConnection(dict([group("posix-ftp", posix=("bob", "alice")), group("other", posix=("alice",))]))
    entry = Entry(BOB_DN, {"cn": ("bob",), "memberof": (f"cn=direct,{GROUPS}", f"CN=POSIX-FTP,{GROUPS}")})
    lookup = FakeLookup()
    member_of = run(resolver(options + "username_attribute = cn\n", SEED_GROUPS).member_of(connection, lookup, entry))
    assert member_of == (f"cn=direct,{GROUPS}", f"CN=POSIX-FTP,{GROUPS}")
    assert connection.searches == [(GROUPS, "(&(objectClass=posixGroup)(memberUid=bob))")]
    assert "1 group(s): cn=posix-ftp,ou=groups,dc=example,dc=com" in lookup.steps[0][1]


def test_group_search_uses_the_entry_username_value_and_dn():
    """{username} is the entry's username_attribute value (as stored) and {dn} its DN."""
    options = f"""
    username_attribute = uid
    group_search_base = {GROUPS}
    group_search_filter = (|(memberUid={{username}})(member={{dn}}))
    group_mapping = memberOf, *, DEFAULT_GROUP
    """
    connection = FakeConnection({})
    entry = Entry("uid=Bob,ou=people,dc=example,dc=com", {"uid": ("Bob",)})
    run(resolver(options).member_of(connection, FakeLookup("BOB"), entry))
    assert connection.searches == [(GROUPS, "(|(memberUid=Bob)(member=uid=Bob,ou=people,dc=example,dc=com))")]


def test_nested_groups_one_search_per_level_and_cycle_safe():
    """Parents of parents are found level by level, one OR search each, and a cycle ends the walk."""
    entries = dict(
        [
            group("team-a", BOB_DN),
            group("team-b", BOB_DN),
            group("dept", f"cn=team-a,{GROUPS}", f"cn=team-b,{GROUPS}"),
            group("division", f"cn=dept,{GROUPS}"),
            group("loop", f"cn=division,{GROUPS}"),
        ]
    )
    # a cycle: team-a is also a member of loop's child chain end
    entries[f"cn=team-a,{GROUPS}"]["member"] = (BOB_DN, f"cn=loop,{GROUPS}")
    options = f"""
    group_search_base = {GROUPS}
    group_search_filter = (member={{dn}})
    nested_groups = yes
    group_mapping = memberOf, g/cn=division,{GROUPS}/, 54ae-987d-09ff
    """
    connection = FakeConnection(entries)
    lookup = FakeLookup()
    member_of = run(resolver(options, SEED_GROUPS).member_of(connection, lookup, Entry(BOB_DN, {})))
    assert {normalise_dn(dn) for dn in member_of} == {
        normalise_dn(f"cn={name},{GROUPS}") for name in ("team-a", "team-b", "dept", "division", "loop")
    }
    filters = [text for _, text in connection.searches]
    assert filters[0] == f"(member={BOB_DN})"
    assert filters[1] == f"(|(member=cn=team-a,{GROUPS})(member=cn=team-b,{GROUPS}))"
    assert filters[2] == f"(member=cn=dept,{GROUPS})"
    assert filters[3] == f"(member=cn=division,{GROUPS})"
    assert filters[4] == f"(member=cn=loop,{GROUPS})"
    assert len(filters) == 5  # loop's parent team-a was already seen: the walk stops
    assert [action for action, _ in lookup.steps] == ["groups"] * 5


def test_nested_groups_stop_at_the_maximum_depth():
    """A chain deeper than MAX_NESTING levels is cut, and the trace says so."""
    chain = [group("level-0", BOB_DN)]
    for depth in range(1, MAX_NESTING + 5):
        chain.append(group(f"level-{depth}", f"cn=level-{depth - 1},{GROUPS}"))
    options = f"""
    group_search_base = {GROUPS}
    group_search_filter = (member={{dn}})
    nested_groups = yes
    group_mapping = memberOf, *, DEFAULT_GROUP
    """
    connection = FakeConnection(dict(chain))
    lookup = FakeLookup()
    member_of = run(resolver(options).member_of(connection, lookup, Entry(BOB_DN, {})))
    assert len(connection.searches) == 1 + MAX_NESTING
    assert len(member_of) == 1 + MAX_NESTING
    assert f"stopped after {MAX_NESTING} levels" in lookup.steps[-1][1]


def test_nested_walk_starts_from_member_of_values_with_the_default_parent_filter():
    """With memberOf and no {dn} filter, parents are searched with (member={dn}) from the memberOf DNs only."""
    options = f"""
    username_attribute = cn
    group_search_base = {GROUPS}
    group_search_filter = (memberUid={{username}})
    nested_groups = yes
    group_mapping = memberOf, *, DEFAULT_GROUP
    """
    entries = dict([group("parent", f"cn=child,{GROUPS}")])
    connection = FakeConnection(entries)
    entry = Entry(BOB_DN, {"cn": ("bob",), "memberof": (f"cn=child,{GROUPS}", "not-a-dn")})
    member_of = run(resolver(options).member_of(connection, FakeLookup(), entry))
    assert f"cn=parent,{GROUPS}" in member_of
    assert connection.searches[1] == (GROUPS, f"(member=cn=child,{GROUPS})")


def test_in_chain_filter_skips_the_walk():
    """With Active Directory's in-chain rule in the filter, the directory resolves nesting: one search only."""
    options = f"""
    group_search_base = {GROUPS}
    group_search_filter = (member:1.2.840.113556.1.4.1941:={{dn}})
    nested_groups = yes
    group_mapping = memberOf, *, DEFAULT_GROUP
    """
    connection = FakeConnection({})
    connection.search_results = []
    lookup = FakeLookup()

    async def in_chain_search(base, scope, filter_object, attributes, size_limit=0):
        connection.searches.append((base, filter_object.asText()))
        return LDAPResult(ldap.SUCCESS, ""), [Entry(f"cn=deep,{GROUPS}", {})]

    connection.search = in_chain_search
    member_of = run(resolver(options).member_of(connection, lookup, Entry(BOB_DN, {})))
    assert member_of == (f"cn=deep,{GROUPS}",)
    assert len(connection.searches) == 1
    assert "resolved by the directory" in lookup.steps[-1][1]


def test_nested_groups_on_active_directory_are_one_in_chain_search():
    """When the root DSE names AD's capability, nested_groups is one in-chain search; the root DSE is read once per server."""
    options = f"""
    group_search_base = {GROUPS}
    nested_groups = yes
    group_mapping = memberOf, *, DEFAULT_GROUP
    """
    connection = FakeConnection({})
    connection.capabilities = (ACTIVE_DIRECTORY_CAPABILITY,)
    read_root_dse = connection.search
    configuration_partition = "ldap://ad.example.com/CN=Configuration,DC=ad,DC=example,DC=com"

    async def directory_search(base, scope, filter_object, attributes, size_limit=0):
        if base == "":
            return await read_root_dse(base, scope, filter_object, attributes, size_limit)
        connection.searches.append((base, filter_object.asText()))
        found = [Entry(f"cn=team,{GROUPS}", {}), Entry(f"cn=department,{GROUPS}", {})]
        return LDAPResult(ldap.SUCCESS, "", referrals=(configuration_partition,)), found

    connection.search = directory_search
    groups = resolver(options)
    lookup = FakeLookup()
    entry = Entry(BOB_DN, {"memberof": (f"CN=Team,{GROUPS}",)})
    member_of = run(groups.member_of(connection, lookup, entry))
    assert member_of == (f"CN=Team,{GROUPS}", f"cn=department,{GROUPS}")
    assert connection.searches == [(GROUPS, f"(member:1.2.840.113556.1.4.1941:={BOB_DN})")]
    details = [detail for _, detail in lookup.steps]
    assert any("one in-chain search" in detail for detail in details)
    assert any(configuration_partition in detail and "global catalog" in detail for detail in details)
    run(groups.member_of(connection, FakeLookup(), entry))
    assert connection.root_dse_reads == 1


def test_without_the_ad_capability_nested_groups_are_walked():
    """A directory whose root DSE does not name AD's capability gets the level-by-level walk."""
    options = f"""
    group_search_base = {GROUPS}
    nested_groups = yes
    group_mapping = memberOf, *, DEFAULT_GROUP
    """
    connection = FakeConnection(dict([group("parent", f"cn=child,{GROUPS}")]))
    entry = Entry(BOB_DN, {"memberof": (f"cn=child,{GROUPS}",)})
    member_of = run(resolver(options).member_of(connection, FakeLookup(), entry))
    assert f"cn=parent,{GROUPS}" in member_of
    assert connection.searches[0] == (GROUPS, f"(member=cn=child,{GROUPS})")
    assert connection.root_dse_reads == 1


def test_failed_group_search_rejects_the_login():
    """A group search the directory refuses ends the login rather than guessing groups."""
    options = f"""
    group_search_base = cn=missing,{BASE}
    group_search_filter = (member={{dn}})
    group_mapping = memberOf, *, DEFAULT_GROUP
    """
    connection = FakeConnection({}, fail=ldap.NO_SUCH_OBJECT)
    with pytest.raises(LoginFailed) as caught:
        run(resolver(options).member_of(connection, FakeLookup(), Entry(BOB_DN, {})))
    assert caught.value.reason == "group-search-failed"


def test_group_search_skipped_when_nothing_reads_member_of():
    """Without a memberOf rule or an external association there is no group search."""
    options = f"""
    group_search_base = {GROUPS}
    group_search_filter = (member={{dn}})
    group_mapping = cn, bob, DEFAULT_GROUP
    """
    connection = FakeConnection({})
    lookup = FakeLookup()
    run(resolver(options).member_of(connection, lookup, Entry(BOB_DN, {"memberof": ("x",)})))
    assert connection.searches == []
    assert "group search skipped" in lookup.steps[0][1]


def test_group_search_binds_as_the_service_account():
    """With a service account, the group search runs as that account."""
    options = f"""
    service_account_dn = cn=reader,{BASE}
    service_account_password = reader-pass
    group_search_base = {GROUPS}
    group_search_filter = (member={{dn}})
    group_mapping = memberOf, *, DEFAULT_GROUP
    """
    connection = FakeConnection({}, {f"cn=reader,{BASE}": "reader-pass"})
    lookup = FakeLookup()
    lookup.settings = configuration(options).authentications["directory"]
    run(resolver(options).member_of(connection, lookup, Entry(BOB_DN, {})))
    assert connection.binds == [f"cn=reader,{BASE}"]


# -- the whole LDAP method: trace, permissions, roles -------------------------------------------------


def method_for(options: str, extra: str, connection: FakeConnection) -> LDAPMethod:
    loaded = configuration("username_attribute = cn\n" + textwrap.dedent(options), extra)
    return LDAPMethod(loaded.authentications["directory"], loaded, MemoryReactorClock(), pool=FakePool(connection))


def bob_directory() -> FakeConnection:
    return FakeConnection(
        {
            BOB_DN: {
                "cn": ("bob",),
                "memberOf": ("sales-apac-oceania", "syadmin"),
                "operationalUnit": ("sales-force-2",),
            }
        },
        {BOB_DN: "bob-pass"},
    )


def test_method_applies_the_primary_group_permissions_and_home():
    """The seed example through the LDAP method: primary group's home folder and permissions, and a traced explanation."""
    method = method_for(SEED_MAPPING, SEED_GROUPS, bob_directory())
    trace = Trace()
    request = LoginRequest("bob", "bob-pass", "ftp", "ftp", "127.0.0.1", trace=trace)
    account = run(method.authenticate(request))
    assert account.groups == ("54ae-987d-09ff", "987d-88de-4213", "8fde-54da-00aa")
    assert account.home_folder == "/srv/apac/bob"
    assert account.permissions == frozenset({Permission.READ, Permission.LIST, Permission.WRITE})
    assert account.roles == ()
    details = [step.detail for step in trace.steps if step.action == "groups"]
    assert any("rule 1 'memberOf, *-apac-*" in detail and "'sales-apac-oceania'" in detail for detail in details)
    assert details[-1] == "groups: 54ae-987d-09ff, 987d-88de-4213, 8fde-54da-00aa (primary: 54ae-987d-09ff)"


def test_method_reads_the_attributes_the_rules_need():
    """Attributes named by group_mapping and roles_mapping are requested from the directory."""
    method = method_for(SEED_MAPPING + "roles_mapping = departmentNumber, 42, DEFAULT-ROLE\n", SEED_GROUPS, bob_directory())
    assert {"memberOf", "operationalUnit", "departmentNumber"} <= set(method._attributes)


def test_method_permissions_differ_by_mapped_group():
    """Two accounts mapped to different groups get different permissions."""
    connection = bob_directory()
    connection.entries[f"cn=ian,{PEOPLE}"] = {"cn": ("ian",), "memberof": ("ops-it-london",)}
    connection.passwords[f"cn=ian,{PEOPLE}"] = "ian-pass"
    method = method_for(SEED_MAPPING, SEED_GROUPS, connection)
    bob = run(method.authenticate(LoginRequest("bob", "bob-pass", "ftp", "ftp", "")))
    ian = run(method.authenticate(LoginRequest("ian", "ian-pass", "ftp", "ftp", "")))
    assert bob.permissions != ian.permissions
    assert ian.groups == ("5b9f-2600-ebd6",) and ian.permissions == frozenset()
    assert ian.home_folder == "/srv/it/ian"


def test_manager_login_gets_mapped_roles():
    """A Web Manager login gets roles from roles_mapping and no groups."""
    options = """
    manager_search_filter = (objectClass=*)
    roles_mapping =
        memberOf, *-it-*, operators
        memberOf, sya*, auditors
    """
    extra = "\n[roles/auditors]\npermissions = configuration, read\n[roles/operators]\n"
    method = method_for(options, extra, bob_directory())
    trace = Trace()
    account = run(method.authenticate(LoginRequest("bob", "bob-pass", "manager", "manager", "", manager=True, trace=trace)))
    assert account.roles == ("auditors",)
    assert account.groups == ()
    roles = [step.detail for step in trace.steps if step.action == "roles"]
    assert "roles_mapping rule 2 'memberOf, sya*, auditors' matched" in roles[1]
    assert roles[-1] == "roles: auditors"


def test_manager_login_without_roles_mapping_gets_default_role():
    """No roles_mapping (or no match): DEFAULT-ROLE."""
    method = method_for("manager_search_filter = (objectClass=*)\n", "", bob_directory())
    account = run(method.authenticate(LoginRequest("bob", "bob-pass", "manager", "manager", "", manager=True)))
    assert account.roles == (models.DEFAULT_ROLE,)


def test_full_control_default_group_without_mapping():
    """Without any group option the account keeps DEFAULT_GROUP's full control, as before."""
    connection = bob_directory()
    loaded = configuration("username_attribute = cn\n", "\n[groups/DEFAULT_GROUP]\nhome_folder_path = /srv/ftp\n")
    method = LDAPMethod(loaded.authentications["directory"], loaded, MemoryReactorClock(), pool=FakePool(connection))
    account = run(method.authenticate(LoginRequest("bob", "bob-pass", "ftp", "ftp", "")))
    assert account.groups == (models.DEFAULT_GROUP,) and account.permissions == FULL_CONTROL
