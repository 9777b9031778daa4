"""Fast unit tests of the LDAP building blocks: DN and filter escaping, the home folder rule, the ldap configuration."""

from __future__ import annotations

import textwrap

import pytest
from ldaptor.protocols import pureldap

from sftpauth.auth.errors import LoginFailed
from sftpauth.auth.ldap import filters
from sftpauth.auth.ldap.dn import AD_REASONS, STRATEGIES, child_dn, classify_bind_failure, parse_dn
from sftpauth.auth.ldap.client import LDAPResult
from sftpauth.auth.ldap.home import HomeFolderRule
from sftpauth.config import models
from sftpauth.config.errors import ConfigError
from sftpauth.config.loader import parse_configuration

BASE = "ou=people,dc=example,dc=com"
PATH = "/etc/sftpauth/server.ini"


def value_of_first_rdn(dn_text: str) -> str:
    [pair] = parse_dn(dn_text).listOfRDNs[0].attributeTypesAndValues
    return pair.value


# -- child_dn: RFC 4514 escaping -----------------------------------------------------------


@pytest.mark.parametrize(
    "value, escaped",
    [
        ("a,b", r"a\,b"),
        ("a+b", r"a\+b"),
        ('a"b', r"a\"b"),
        ("a\\b", r"a\\b"),
        ("a<b", r"a\<b"),
        ("a>b", r"a\>b"),
        ("a;b", r"a\;b"),
        ("#lead", r"\#lead"),
        (" lead", r"\ lead"),
        ("trail ", r"trail\ "),
        ("nul\0byte", r"nul\00byte"),
        ("a=b", r"a\=b"),
        ("Müller, Jürgen", r"Müller\, Jürgen"),
        ("alice,ou=Engineering", r"alice\,ou\=Engineering"),
    ],
)
def test_child_dn_escapes_rfc4514_specials(value, escaped):
    """child_dn puts the value into one RDN with every RFC 4514 special escaped, so it can never add RDNs."""
    dn = child_dn("uid", value, parse_dn(BASE))
    assert dn == f"uid={escaped},{BASE}"
    parsed = parse_dn(dn)
    assert len(parsed.listOfRDNs) == 1 + len(parse_dn(BASE).listOfRDNs)
    assert value_of_first_rdn(dn) == value


@pytest.mark.parametrize(
    "value",
    ["a,b", "a+b+c", 'q"uote', "back\\slash", "<>", "x;y", "#hash", " both ", "nul\0", "=", ",cn=admin", "*)(uid=*", "Ünïcödé"],
)
def test_child_dn_round_trips_through_parse_dn(value):
    """A value escaped by child_dn comes back unchanged from parse_dn, and the base is kept as is."""
    base = parse_dn(BASE)
    parsed = parse_dn(child_dn("cn", value, base))
    assert value_of_first_rdn(parsed.getText()) == value
    assert parsed.listOfRDNs[1:] == base.listOfRDNs


def test_parse_dn_rejects_text_that_is_not_a_dn():
    """parse_dn raises ValueError with the text quoted for anything that is not a DN."""
    for text in ("not a dn", "", "uid=alice,,dc=com", "uid=alice,garbage"):
        with pytest.raises(ValueError) as caught:
            parse_dn(text)
        assert repr(text) in str(caught.value)


def test_parse_dn_decodes_rfc4514_hex_pairs_as_utf8():
    """A DN written with RFC 4514 hex pairs (what ldapsearch prints) means the same entry as its UTF-8 form."""
    hex_form = r"cn=M\C3\BCller\2C J\C3\BCrgen,ou=Engineering,ou=people,dc=example,dc=com"
    assert value_of_first_rdn(hex_form) == "Müller, Jürgen"
    assert value_of_first_rdn(hex_form.lower()) == "müller, jürgen"


# -- filters: RFC 4515 escaping and parsing ------------------------------------------------


@pytest.mark.parametrize(
    "value, text",
    [
        ("*", r"(uid=\2a)"),
        ("(", r"(uid=\28)"),
        (")", r"(uid=\29)"),
        ("\\", r"(uid=\5c)"),
        ("\0", r"(uid=\00)"),
        ("alice)(uid=*", r"(uid=alice\29\28uid=\2a)"),
        ("*)(|(uid=*", r"(uid=\2a\29\28|\28uid=\2a)"),
        ("plain", "(uid=plain)"),
    ],
)
def test_equals_escapes_rfc4515_specials(value, text):
    """filters.equals makes one equality assertion whose text form escapes '*', '(', ')', '\\' and NUL."""
    built = filters.equals("uid", value)
    assert isinstance(built, pureldap.LDAPFilter_equalityMatch)
    assert built.asText() == text
    assert built.assertionValue.value == value  # sent as the raw assertion value, never parsed


@pytest.mark.parametrize("value", ["*", "alice)(uid=*", "*)(|(uid=*", "a\\2a", "\0"])
def test_escaped_equality_filter_parses_back_to_the_same_value(value):
    """The text of an equals() filter, parsed again, is still one equality test of the same value."""
    parsed = filters.parse_filter(filters.equals("uid", value).asText())
    assert isinstance(parsed, pureldap.LDAPFilter_equalityMatch)
    assert parsed.assertionValue.value == value


@pytest.mark.parametrize(
    "text", ["(uid=a", "uid=a)", "((uid=a)", "(&(uid=a)", "(uid=a))", "()", "(=a)", "(|(a=b)(c=d)", "garbage("]
)
def test_parse_filter_rejects_bad_filters(text):
    """parse_filter raises InvalidFilter naming the filter as written and RFC 4515 for a malformed filter."""
    with pytest.raises(filters.InvalidFilter) as caught:
        filters.parse_filter(f" {text} ")
    assert str(caught.value).startswith(f"{text!r} is not a valid LDAP filter (RFC 4515): ")


def test_parse_filter_accepts_good_filters_with_or_without_parentheses():
    """A configured filter may omit the outer parentheses; an empty one is None (no filter)."""
    assert filters.parse_filter("") is None
    assert filters.parse_filter("   ") is None
    member = "(memberOf=cn=ftp-users,ou=groups,dc=example,dc=com)"
    assert filters.parse_filter(member).asText() == member
    assert filters.parse_filter(member[1:-1]).asText() == member
    assert filters.parse_filter("(&(objectClass=person)(|(uid=a)(uid=b)))").asText() == "(&(objectClass=person)(|(uid=a)(uid=b)))"


def test_both_and_as_text():
    """both() ANDs the user test with the configured filter, or returns it alone; as_text shows no filter as (objectClass=*)."""
    user = filters.equals("uid", "alice")
    assert filters.both(user, None) is user
    member = filters.parse_filter("(memberOf=cn=g,dc=x)")
    assert filters.both(user, member).asText() == "(&(uid=alice)(memberOf=cn=g,dc=x))"
    assert filters.as_text(None) == "(objectClass=*)"


# -- Active Directory sub-codes ---------------------------------------------------------------


def test_ad_sub_codes_are_classified():
    """Every AD error-49 sub-code of the spec has a reason; other messages have none."""
    assert set(AD_REASONS) == {"525", "52e", "530", "531", "532", "533", "701", "773", "775"}
    message = "80090308: LdapErr: DSID-0C09042A, comment: AcceptSecurityContext error, data 52E, v3839"
    assert classify_bind_failure(LDAPResult(49, message)) == AD_REASONS["52e"]
    assert classify_bind_failure(LDAPResult(49, "Invalid credentials")) is None
    assert classify_bind_failure(LDAPResult(49, "")) is None


def test_every_bind_dn_type_has_a_strategy():
    """Each bind_dn_type allowed by the configspec has a BIND strategy."""
    assert set(STRATEGIES) == {"parent", "relative", "absolute", "direct-username", "search"}


# -- HomeFolderRule ----------------------------------------------------------------------------


def values_from(mapping):
    lowered = {key.lower(): tuple(value) for key, value in mapping.items()}
    return lambda name: lowered.get(name.lower(), ())


def home_failure(rule: HomeFolderRule, mapping) -> LoginFailed:
    with pytest.raises(LoginFailed) as caught:
        rule.resolve(values_from(mapping))
    assert caught.value.reason == "home-folder-invalid"
    return caught.value


def test_home_rule_parse_attribute_alone_and_empty():
    """An attribute alone is a rule without template; an empty option is no rule."""
    assert HomeFolderRule.parse("homeDirectory") == HomeFolderRule("homeDirectory")
    assert HomeFolderRule.parse("  ") is None
    assert HomeFolderRule.parse("homeDirectory").attributes == ("homeDirectory",)


def test_home_rule_parse_template_with_dashes_as_underscores():
    """In a template '{ftp_Home_Dir}' reads the ftp-Home-Dir attribute."""
    rule = HomeFolderRule.parse("ftp-Home-Dir, /srv/homes/{ftp_Home_Dir}")
    assert rule == HomeFolderRule("ftp-Home-Dir", "/srv/homes/{ftp_Home_Dir}")
    assert rule.attributes == ("ftp-Home-Dir",)
    assert rule.resolve(values_from({"ftp-home-dir": ["alice-home"]})) == "/srv/homes/alice-home"


def test_home_rule_template_with_several_placeholders():
    """A template may combine several attributes; each one is read from the entry."""
    rule = HomeFolderRule.parse("uid, /srv/{department}/{uid}")
    assert rule.attributes == ("uid", "department")
    assert rule.resolve(values_from({"uid": ["alice"], "department": ["eng"]})) == "/srv/eng/alice"


@pytest.mark.parametrize("text", ["a b", ", /x/{a}", "uid, /x/{}", "uid, /x/{a.b}", "uid, /x/{a[0]}", "uid, /x/{a"])
def test_home_rule_parse_rejects_bad_rules(text):
    """Attribute names with spaces, empty or non-attribute placeholders and broken templates are refused."""
    with pytest.raises(ValueError):
        HomeFolderRule.parse(text)


@pytest.mark.parametrize(
    "text, written",
    [("uid, /srv/{uid!r}", "{uid!r}"), ("uid, /srv/{uid:>10}", "{uid:>10}"), ("uid, /srv/{uid!s:x}", "{uid!s:x}"),
     ("uid, /srv/{0}", "{0}"), ("uid, /srv/{1uid}", "{1uid}"), ("uid, /srv/{ü}", "{ü}")],
)
def test_home_rule_placeholders_are_plain_attribute_names(text, written):
    """Python's format syntax would reshape a value ('/srv/'alice'') or fail at each login: refused at load time."""
    with pytest.raises(ValueError, match="is not a placeholder such as") as raised:
        HomeFolderRule.parse(text)
    assert repr(written) in str(raised.value)


@pytest.mark.parametrize("template", ["homes/{uid}", "./{uid}", "~/{uid}", " x{uid}"])
def test_home_rule_template_must_give_an_absolute_path(template):
    """A template whose text before the first placeholder is no absolute path can give no home: refused at load time."""
    with pytest.raises(ValueError, match="absolute path"):
        HomeFolderRule.parse(f"uid, {template}")


@pytest.mark.parametrize("template", ["{homeDirectory}/ftp", "/srv/{{literal}}/{uid}", "/srv/shared"])
def test_home_rule_template_may_start_with_a_placeholder(template):
    """A template may start with an attribute holding an absolute path, and keep literal braces as '{{' '}}'."""
    assert HomeFolderRule.parse(f"uid, {template}").template == template


def test_home_rule_absolute_value_without_template():
    """Without template the attribute's absolute value is the home folder, normalised."""
    rule = HomeFolderRule("homeDirectory")
    assert rule.resolve(values_from({"homeDirectory": ["/srv/ftp/alice"]})) == "/srv/ftp/alice"
    assert rule.resolve(values_from({"homeDirectory": ["/srv//ftp/./alice/"]})) == "/srv/ftp/alice"


def test_home_rule_multi_valued_is_invalid():
    """An attribute with two values cannot give a home folder."""
    failure = home_failure(HomeFolderRule("ftpHomeMulti"), {"ftpHomeMulti": ["/srv/one", "/srv/two"]})
    assert "2 values" in failure.explanation


def test_home_rule_missing_or_empty_is_invalid():
    """A missing attribute, or one with an empty or blank value, cannot give a home folder."""
    assert "no 'homeDirectory'" in home_failure(HomeFolderRule("homeDirectory"), {}).explanation
    home_failure(HomeFolderRule("homeDirectory"), {"homeDirectory": [""]})
    home_failure(HomeFolderRule("homeDirectory"), {"homeDirectory": ["   "]})
    home_failure(HomeFolderRule("uid", "/srv/{uid}"), {})


def test_home_rule_relative_value_is_invalid():
    """A relative value without template (or a template giving a relative path) is refused."""
    home_failure(HomeFolderRule("ftp-Home-Dir"), {"ftp-Home-Dir": ["alice-home"]})
    home_failure(HomeFolderRule("uid", "homes/{uid}"), {"uid": ["alice"]})


@pytest.mark.parametrize(
    "rule, value",
    [
        (HomeFolderRule("ftp-Home-Dir"), "/srv/ftp/../../etc"),
        (HomeFolderRule("ftp-Home-Dir", "/srv/homes/{ftp_Home_Dir}"), "../../etc"),
        (HomeFolderRule("ftp-Home-Dir", "/srv/homes/{ftp_Home_Dir}"), ".."),
        (HomeFolderRule("ftp-Home-Dir", "/srv/homes/{ftp_Home_Dir}"), "x/../../y"),
        (HomeFolderRule("ftp-Home-Dir", "/srv/homes/{ftp_Home_Dir}"), "..\\..\\etc"),
    ],
)
def test_home_rule_dot_dot_is_invalid(rule, value):
    """A value that climbs with '..' (with '/' or AD's '\\') is refused, with or without template."""
    failure = home_failure(rule, {"ftp-Home-Dir": [value]})
    assert "'..'" in failure.explanation


@pytest.mark.parametrize("value", [".", "/", "./", "//"])
def test_home_rule_value_naming_no_folder_is_invalid(value):
    """A placeholder value that names no folder cannot turn '/srv/homes/{uid}' into '/srv/homes' itself."""
    home_failure(HomeFolderRule.parse("uid, /srv/homes/{uid}"), {"uid": [value]})


def test_home_rule_backslashes_of_ad_values_become_slashes():
    """An AD value such as 'users\\john' is a path below the template's folder."""
    rule = HomeFolderRule.parse("homeDirectory, /srv/ad/{homeDirectory}")
    assert rule.resolve(values_from({"homeDirectory": ["users\\john"]})) == "/srv/ad/users/john"


# -- the [authentications/ID] type = ldap configuration -------------------------------------------


def parse(text: str) -> models.Configuration:
    return parse_configuration(textwrap.dedent(text), PATH, "/etc/sftpauth", {})


def problems_of(text: str):
    with pytest.raises(ConfigError) as caught:
        parse(text)
    return caught.value.problems


def test_missing_address_is_an_error():
    """An ldap section without address is refused, naming the section and option."""
    problems = problems_of(
        """
        [authentications/ldap]
        type = ldap
        bind_dn = dc=example,dc=com
        """
    )
    assert [(p.line, p.section, p.option) for p in problems] == [(2, "authentications/ldap", "address")]
    assert "required" in problems[0].message


def test_bad_filter_names_its_line():
    """A malformed search_filter is an error on the line of that option, naming RFC 4515."""
    problems = problems_of(
        """
        [authentications/ldap]
        type = ldap
        address = 127.0.0.1
        bind_dn = dc=example,dc=com
        manager_search_filter = (memberOf=cn=admins,dc=example,dc=com)
        search_filter = (memberOf=cn=ftp,dc=example,dc=com
        """
    )
    assert [(p.line, p.section, p.option) for p in problems] == [(7, "authentications/ldap", "search_filter")]
    assert "RFC 4515" in problems[0].message
    assert str(problems[0]).startswith(f"{PATH}:7 [authentications/ldap] search_filter: ")


def test_bad_dn_in_bind_dn_is_an_error():
    """A line of bind_dn that is not a DN is an error on that line, naming bind_dn and quoting it."""
    problems = problems_of(
        """
        [authentications/ldap]
        type = ldap
        address = 127.0.0.1
        bind_dn =
            ou=people,dc=example,dc=com
            not a dn
        """
    )
    bad = [p for p in problems if "'not a dn'" in p.message]
    assert len(bad) == 1
    assert (bad[0].line, bad[0].section, bad[0].option) == (7, "authentications/ldap", "bind_dn")


def test_bad_service_account_dn_is_an_error():
    """service_account_dn must be a DN too."""
    problems = problems_of(
        """
        [authentications/ldap]
        type = ldap
        address = 127.0.0.1
        bind_dn = dc=example,dc=com
        bind_dn_type = search
        service_account_dn = admin
        service_account_password = secret
        """
    )
    assert [(p.line, p.option) for p in problems] == [(7, "service_account_dn")]


def test_unknown_base_group_is_an_error():
    """base_groups may only name defined groups."""
    problems = problems_of(
        """
        [groups/ldap-users]
        home_folder_path = /srv/ftp

        [authentications/ldap]
        type = ldap
        address = 127.0.0.1
        bind_dn = dc=example,dc=com
        base_groups = ldap-users, nope
        """
    )
    assert [(p.line, p.section, p.option) for p in problems] == [(9, "authentications/ldap", "base_groups")]
    assert "unknown group 'nope'" in problems[0].message


@pytest.mark.parametrize("bind_dn_type", ["parent", "relative", "direct-username", "search"])
def test_bind_dn_is_required_unless_absolute(bind_dn_type):
    """Every bind_dn_type but absolute needs at least one base DN."""
    problems = problems_of(
        f"""
        [authentications/ldap]
        type = ldap
        address = 127.0.0.1
        bind_dn_type = {bind_dn_type}
        """
    )
    assert [(p.section, p.option) for p in problems] == [("authentications/ldap", "bind_dn")]
    assert bind_dn_type in problems[0].message


def test_absolute_needs_no_bind_dn():
    """bind_dn_type = absolute loads without any bind_dn."""
    method = parse(
        """
        [authentications/ldap]
        type = ldap
        address = 127.0.0.1
        bind_dn_type = absolute
        """
    ).authentications["ldap"]
    assert method.bind_dn_type == "absolute"
    assert method.bind_dn == ()


def test_other_ldap_option_errors_name_the_option():
    """Bad bind_dn_type, home_folder_attribute, attribute names and timeouts are errors on their own line."""
    problems = problems_of(
        """
        [authentications/ldap]
        type = ldap
        address = 127.0.0.1
        bind_dn = dc=example,dc=com
        bind_dn_type = guess
        home_folder_attribute = home dir
        username_attribute = u_id
        timeout = 600
        service_account_dn = cn=admin,dc=example,dc=com
        """
    )
    found = {(p.line, p.option) for p in problems}
    assert {(6, "bind_dn_type"), (7, "home_folder_attribute"), (8, "username_attribute"), (9, "timeout")} <= found
    assert (10, "service_account_password") in found or (2, "service_account_password") in found


def test_sftpplus_documentation_style_section_loads():
    """An SFTPPlus-style ldap section (several base DNs on continuation lines, a home template) loads unchanged."""
    configuration = parse(
        """
        [server]
        authentications = ad-users

        [groups/ftp-users]
        name = FTP users
        home_folder_path = /srv/ftp
        create_home_folder = yes

        [authentications/ad-users]
        enabled = yes
        type = ldap
        name = Company Active Directory
        description = Authenticate the FTP users against Active Directory.
        address = 192.168.1.12
        port = 389
        secure_connection = no
        bind_dn_type = parent
        bind_dn =
            ou=IT-Ops,cn=Users,dc=ad,dc=example,dc=com
            ou=Accounting,cn=Users,dc=ad,dc=example,dc=com
        username_attribute = sAMAccountName
        search_filter = (memberOf=cn=FTP-Users,ou=Groups,dc=ad,dc=example,dc=com)
        home_folder_attribute = sAMAccountName, /srv/ftp/{sAMAccountName}
        base_groups = ftp-users
        """
    )
    method = configuration.authentications["ad-users"]
    assert isinstance(method, models.LDAPAuthenticationSettings)
    assert method.address == (("192.168.1.12", None),)
    assert method.port == 389
    assert method.bind_dn_type == "parent"
    assert [dn.getText() for dn in method.bind_dn] == [
        "ou=IT-Ops,cn=Users,dc=ad,dc=example,dc=com",
        "ou=Accounting,cn=Users,dc=ad,dc=example,dc=com",
    ]
    assert method.username_attribute == "sAMAccountName"
    assert method.search_filter.asText() == "(memberOf=cn=FTP-Users,ou=Groups,dc=ad,dc=example,dc=com)"
    assert method.manager_search_filter is None
    assert method.home_folder_attribute == HomeFolderRule("sAMAccountName", "/srv/ftp/{sAMAccountName}")
    assert method.base_groups == ("ftp-users",)
    assert configuration.server.authentications == ("ad-users",)
    assert [(w.section, w.option) for w in configuration.warnings] == [("authentications/ad-users", "description")]


def test_address_list_with_ports_and_ipv6():
    """address takes a failover list host[:port], IPv6 in brackets, defaulting to port."""
    method = parse(
        """
        [authentications/ldap]
        type = ldap
        address = ldap1.example.com:1389, 127.0.0.1, [::1]:636
        port = 10389
        bind_dn = dc=example,dc=com
        """
    ).authentications["ldap"]
    assert method.address == (("ldap1.example.com", 1389), ("127.0.0.1", None), ("::1", 636))
    assert method.port == 10389


def test_verify_hint_for_a_certificate_without_subject_alt_name():
    """A CN-only certificate matches no address (service-identity reads subjectAltName): the hint says so, not "()"."""
    import datetime

    from sftpauth.auth.ldap.client import LDAPUnavailable, ServerAddress
    from sftpauth.auth.ldap.tls import CertificateSummary, TLSReport
    from sftpauth.auth.ldap.verify import _tls_hint

    now = datetime.datetime.now(datetime.timezone.utc)
    summary = CertificateSummary("CN=ldap.example.com", "CN=CA", now, now + datetime.timedelta(days=30), ())
    report = TLSReport("ldap.example.com", True, summary)
    error = LDAPUnavailable("certificate name mismatch", kind="tls-name-mismatch")
    hint = _tls_hint(error, report, None, ServerAddress("ldap.example.com", 636))
    assert hint == (
        "certificate name mismatch: the certificate has no subjectAltName (subject CN=ldap.example.com), "
        "so no address can match it: reissue it with subjectAltName ldap.example.com"
    )
