"""The ldap authentication method against a real OpenLDAP slapd (SPEC §3), in process and through real FTP/SFTP logins.

The in-process tests build the configuration with the real loader and run
LDAPMethod and AuthenticationChain on the test's reactor (pytest-twisted);
each login's audit event is read back from the audit log file. The service
tests run one real ``twistd -n sftpauth`` with FTP and SFTP services whose
only authentication is an ldap method pointing at the slapd fixture.
Users, passwords and attributes: tests/integration/data/directory.ldif.
"""

from __future__ import annotations

import ftplib
import io
import os
import time
import unicodedata
from pathlib import Path

import paramiko
import pytest
import pytest_twisted
from twisted.internet import defer, task

from .ldap_helpers import (
    ACCOUNTING,
    ADMINS,
    ALICE_DN,
    BASE,
    BOB_DN,
    CAROL_DN,
    CONTRACTORS,
    ENGINEERING,
    FTP_USERS,
    JMULLER_CN,
    JMULLER_DN,
    JMULLER_DN_HEX,
    PASSWORDS,
    PEOPLE,
    InProcessLDAP,
    LDAPClientSpy,
    connections_left,
    connections_to,
    ldap_section,
    open_fds,
)
from .server import SftpauthServer, free_port, serving

pytestmark = pytest.mark.slapd

TIMEOUT = 10

SEARCH_AS_ADMIN = """
bind_dn_type = search
bind_dn = {base}
username_attribute = uid
service_account_dn = {admin_dn}
service_account_password = {admin_password}
"""


@pytest.fixture
def ldap(slapd, tmp_path):
    """Build an in-process ldap method and chain from an options snippet (the slapd address is filled in)."""
    made = []

    def make(options: str, extra: str = "", authentications: str = "ldap") -> InProcessLDAP:
        options = options.format(base=BASE, admin_dn=slapd.admin_dn, admin_password=slapd.admin_password, tmp=tmp_path)
        harness = InProcessLDAP(slapd, tmp_path / f"site{len(made)}", options, extra, authentications)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()


@pytest.fixture
def spy(monkeypatch):
    """Counts LDAP connections, UNBINDs and closes made by this process."""
    return LDAPClientSpy(monkeypatch)


def binds_of(outcome) -> list[str]:
    return [step.detail for step in outcome.trace.steps if step.action == "bind"]


# -- every bind_dn_type against slapd -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_parent_binds_as_username_attribute_under_the_base(ldap):
    """parent: alice logs in by binding as uid=alice,BASE and her entry and groups are read."""
    site = ldap(f"bind_dn_type = parent\nbind_dn = {ENGINEERING}\nusername_attribute = uid\nemail_attribute = mail")
    outcome = await site.login("alice", "alice-pass")
    assert outcome.ok, outcome
    assert outcome.account.dn == ALICE_DN
    assert outcome.account.email == "alice@example.com"
    assert outcome.account.groups == ("ldap-users",)
    assert binds_of(outcome) == [f"BIND as {ALICE_DN}: success"]
    assert (outcome.event["outcome"], outcome.event["method"], outcome.event["reason"]) == ("success", "ldap", "")


@pytest_twisted.ensureDeferred
async def test_relative_appends_the_base_to_the_typed_fragment(ldap):
    """relative: the username 'uid=alice,ou=Engineering' gets ',ou=people,dc=example,dc=com' appended."""
    site = ldap(f"bind_dn_type = relative\nbind_dn = {PEOPLE}")
    outcome = await site.login("uid=alice,ou=Engineering", "alice-pass")
    assert outcome.ok, outcome
    assert outcome.account.dn == ALICE_DN
    assert binds_of(outcome) == [f"BIND as {ALICE_DN}: success"]
    wrong = await site.login("uid=alice,ou=Engineering", "bob-pass")
    assert wrong.reason == "invalid-password"
    not_a_dn = await site.login("alice", "alice-pass")
    assert not_a_dn.reason == "invalid-username"


@pytest_twisted.ensureDeferred
async def test_absolute_binds_as_the_whole_dn(ldap):
    """absolute: the username is the whole DN and no bind_dn is needed."""
    site = ldap("bind_dn_type = absolute")
    outcome = await site.login(ALICE_DN, "alice-pass")
    assert outcome.ok, outcome
    assert outcome.account.dn == ALICE_DN
    jmuller = await site.login(JMULLER_DN, "jürgen-päss")
    assert jmuller.ok, jmuller
    assert (await site.login(CAROL_DN, "alice-pass")).reason == "invalid-password"
    assert (await site.login(f"uid=nobody,{PEOPLE}", "x-pass")).reason == "unknown-user"


@pytest_twisted.ensureDeferred
async def test_absolute_accepts_a_dn_with_rfc4514_hex_escapes(ldap):
    """absolute: 'cn=M\\C3\\BCller\\2C J\\C3\\BCrgen,...' (hex pairs of UTF-8) is the same entry as the UTF-8 form."""
    site = ldap("bind_dn_type = absolute")
    outcome = await site.login(JMULLER_DN_HEX, "jürgen-päss")
    assert outcome.ok, outcome


@pytest_twisted.ensureDeferred
async def test_search_as_the_service_account(ldap, slapd):
    """search: the admin service account finds uid=alice anywhere below the base, then alice's own BIND decides."""
    site = ldap(SEARCH_AS_ADMIN)
    outcome = await site.login("alice", "alice-pass")
    assert outcome.ok, outcome
    assert outcome.account.dn == ALICE_DN
    assert binds_of(outcome) == [f"BIND as service account {slapd.admin_dn}: success", f"BIND as {ALICE_DN}: success"]
    carol = await site.login("carol", "carol-pass")
    assert carol.account.dn == CAROL_DN
    assert (await site.login("alice", "carol-pass")).reason == "invalid-password"
    assert (await site.login("nobody", "alice-pass")).reason == "unknown-user"


@pytest_twisted.ensureDeferred
async def test_search_anonymously_without_service_account(ldap):
    """search: with an empty service_account_dn the search is anonymous, and the user's BIND still decides."""
    site = ldap("bind_dn_type = search\nbind_dn = {base}\nusername_attribute = uid\nservice_account_dn =")
    outcome = await site.login("carol", "carol-pass")
    assert outcome.ok, outcome
    assert outcome.account.dn == CAROL_DN
    assert binds_of(outcome)[0] == "searching anonymously (no service_account_dn)"
    assert (await site.login("carol", "alice-pass")).reason == "invalid-password"


@pytest_twisted.ensureDeferred
async def test_wrong_service_account_password_is_refused(ldap, slapd):
    """search: a service account that cannot BIND refuses every login with service-account-failed."""
    site = ldap(
        SEARCH_AS_ADMIN.replace("{admin_password}", "not-the-admin-password")
    )
    assert (await site.login("alice", "alice-pass")).reason == "service-account-failed"


# -- several base DNs -------------------------------------------------------------------------

MISSING = f"ou=nosuch,{BASE}"  # a base DN that does not exist

PARENT_THREE_BASES = f"""
bind_dn_type = parent
username_attribute = uid
bind_dn =
    {ACCOUNTING}
    {ENGINEERING}
    {CONTRACTORS}
"""


@pytest_twisted.ensureDeferred
async def test_parent_tries_the_bases_top_to_bottom(ldap):
    """parent with three bases: bob is found in the first, alice in the second, carol in the third."""
    site = ldap(PARENT_THREE_BASES)
    bob = await site.login("bob", "bob-pass")
    assert bob.account.dn == BOB_DN
    assert binds_of(bob) == [f"BIND as {BOB_DN}: success"]
    alice = await site.login("alice", "alice-pass")
    assert alice.account.dn == ALICE_DN
    assert [step.split(":")[0] for step in binds_of(alice)] == [
        f"BIND as uid=alice,{ACCOUNTING}",
        f"BIND as {ALICE_DN}",
    ]
    carol = await site.login("carol", "carol-pass")
    assert carol.account.dn == CAROL_DN
    assert len(binds_of(carol)) == 3


@pytest_twisted.ensureDeferred
async def test_wrong_password_ends_the_walk_at_the_base_where_the_user_is(ldap):
    """A wrong password for alice (found in the second base) is invalid-password; the third base is never tried."""
    site = ldap(PARENT_THREE_BASES)
    outcome = await site.login("alice", "carol-pass")
    assert outcome.reason == "invalid-password"
    assert all(CONTRACTORS not in step for step in binds_of(outcome))
    assert outcome.event["detail"] == f"wrong password for {ALICE_DN}"


@pytest_twisted.ensureDeferred
async def test_every_base_tried_is_named_when_all_fail(ldap):
    """When no base holds the user, the explanation names each DN tried, in order."""
    site = ldap(PARENT_THREE_BASES)
    outcome = await site.login("nobody", "nobody-pass")
    assert outcome.reason == "unknown-user"
    assert outcome.event["detail"] == "; ".join(
        f"no entry uid=nobody,{base}" for base in (ACCOUNTING, ENGINEERING, CONTRACTORS))
    assert len(binds_of(outcome)) == 3


@pytest_twisted.ensureDeferred
async def test_search_tries_the_bases_top_to_bottom(ldap, slapd):
    """search with several bases: the first base holding a match decides, later ones are not searched."""
    site = ldap(
        f"""
        bind_dn_type = search
        username_attribute = uid
        service_account_dn = {slapd.admin_dn}
        service_account_password = {slapd.admin_password}
        bind_dn =
            {MISSING}
            {CONTRACTORS}
            {ENGINEERING}
            {PEOPLE}
        """
    )
    alice = await site.login("alice", "alice-pass")
    assert alice.account.dn == ALICE_DN
    searches = [step.detail for step in alice.trace.steps if step.action == "search"]
    assert searches[:3] == [
        # a mistyped base DN says so in test-login's trace, not '0 entries'
        f"search (uid=alice) under {MISSING}: no such object (32), the base DN does not exist",
        f"search (uid=alice) under {CONTRACTORS}: 0 entries",
        f"search (uid=alice) under {ENGINEERING}: 1 entry",
    ]
    assert not any(f"under {PEOPLE}" in search for search in searches)
    # dup is twice under ou=people but once under ou=Engineering, which comes first.
    dup = await site.login("dup", "dup-pass")
    assert dup.account.dn == f"uid=dup,{ENGINEERING}"


# -- audit reasons ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unknown_user_and_invalid_password_are_audited(ldap):
    """The audit log says unknown-user for a missing entry and invalid-password for a wrong password."""
    site = ldap(f"bind_dn_type = parent\nbind_dn = {ENGINEERING}\nusername_attribute = uid")
    unknown = await site.login("nobody", "whatever")
    wrong = await site.login("alice", "not-alice-pass")
    for outcome, reason in ((unknown, "unknown-user"), (wrong, "invalid-password")):
        assert outcome.account is None
        assert outcome.event["event"] == "authentication"
        assert (outcome.event["outcome"], outcome.event["reason"], outcome.event["method"]) == ("failure", reason, "ldap")
    assert "not-alice-pass" not in site.audit_path.read_text(encoding="utf-8")


@pytest.mark.parametrize("bind_dn_type", ["parent", "search"])
@pytest_twisted.ensureDeferred
async def test_search_filter_refuses_bob(ldap, bind_dn_type):
    """search_filter (memberOf=cn=ftp-users,...) refuses bob with filter-mismatch and accepts alice."""
    site = ldap(
        f"""
        bind_dn_type = {bind_dn_type}
        username_attribute = uid
        bind_dn =
            {ACCOUNTING}
            {ENGINEERING}
        search_filter = (memberOf={FTP_USERS})
        """
    )
    bob = await site.login("bob", "bob-pass")
    assert bob.reason == "filter-mismatch"
    assert bob.event["reason"] == "filter-mismatch"
    assert (await site.login("alice", "alice-pass")).ok


@pytest_twisted.ensureDeferred
async def test_search_for_dup_is_ambiguous(ldap):
    """search under ou=people finds two uid=dup entries: ambiguous-user, and neither is tried."""
    site = ldap(SEARCH_AS_ADMIN.replace("{base}", PEOPLE))
    outcome = await site.login("dup", "dup-pass")
    assert outcome.reason == "ambiguous-user"
    assert outcome.event["reason"] == "ambiguous-user"
    assert not any(step.startswith("BIND as uid=dup") for step in binds_of(outcome))


@pytest.mark.parametrize(
    "home_option, username, explanation",
    [
        ("ftpHomeMulti", "carol", "2 values"),
        ("ftp-Home-Dir", "alice", "not an absolute path"),
        ("ftp-Home-Dir", "jmuller", "'..'"),
        ("ftp-Home-Dir, {tmp}/homes/{{ftp_Home_Dir}}", "jmuller", "'..'"),
        ("homeDirectory", "bob", "no 'homeDirectory'"),
        ("ftp-Home-Dir, {tmp}/homes/{{ftp_Home_Dir}}", "carol", "no 'ftp-Home-Dir'"),
    ],
    ids=["multi-valued", "relative", "dot-dot", "dot-dot-in-template", "missing", "missing-in-template"],
)
@pytest_twisted.ensureDeferred
async def test_unusable_home_folder_attribute_is_home_folder_invalid(ldap, tmp_path, home_option, username, explanation):
    """A multi-valued, relative, '..' or missing home folder attribute refuses the login with home-folder-invalid."""
    site = ldap(SEARCH_AS_ADMIN + f"home_folder_attribute = {home_option}\n")
    outcome = await site.login(username, PASSWORDS[username])
    assert outcome.reason == "home-folder-invalid", outcome
    assert explanation in outcome.event["detail"]
    assert not (tmp_path / "etc").exists()


ODD_NAMES = "ou=odd-names," + BASE
_odd_names_added = []


@pytest_twisted.ensureDeferred
async def test_a_user_name_that_is_not_one_folder_name_gets_no_home(ldap, slapd):
    """QA: uid '.' got the folder of every user's home (reading alice's files), uid 'a/b' a folder in a's home.

    Real entries in slapd; both logins are refused as home-folder-invalid and no folder is made.
    """
    if not _odd_names_added:
        slapd.add_ldif(
            f"dn: {ODD_NAMES}\nobjectClass: organizationalUnit\nou: odd-names\n\n"
            + "\n".join(
                f"dn: uid={uid},{ODD_NAMES}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid}\nsn: odd\n"
                f"userPassword: {uid}-pass\n"
                for uid in (".", "a/b")
            )
        )
        _odd_names_added.append(True)
    site = ldap(SEARCH_AS_ADMIN.replace("{base}", ODD_NAMES))
    (site.folder / "homes" / "a").mkdir(parents=True)
    for uid in (".", "a/b"):
        outcome = await site.login(uid, f"{uid}-pass")
        assert outcome.reason == "home-folder-invalid", outcome
        assert "cannot stand for ${USER}" in outcome.event["detail"]
    assert [path.name for path in (site.folder / "homes").iterdir()] == ["a"]
    assert list((site.folder / "homes" / "a").iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_closed_port_is_service_unavailable_fast(slapd, tmp_path, spy):
    """An address on a closed port fails at once with service-unavailable; the chain never accepts."""
    site = InProcessLDAP(
        slapd, tmp_path / "down", f"bind_dn_type = parent\nbind_dn = {ENGINEERING}\nusername_attribute = uid", port=free_port()
    )
    try:
        started = time.monotonic()
        outcome = await site.login("alice", "alice-pass")
        elapsed = time.monotonic() - started
        assert outcome.reason == "service-unavailable", outcome
        assert outcome.account is None
        assert (outcome.event["outcome"], outcome.event["reason"]) == ("failure", "service-unavailable")
        assert "connection refused" in outcome.event["detail"]
        assert elapsed < 2
        assert spy.connected == 0
    finally:
        site.close()


@pytest_twisted.ensureDeferred
async def test_empty_password_is_refused_without_ldap_traffic(ldap, spy):
    """An empty or blank password is audited as empty-password and no LDAP connection is even opened."""
    site = ldap(f"bind_dn_type = parent\nbind_dn = {ENGINEERING}\nusername_attribute = uid")
    for password in ("", "   ", "\t "):
        outcome = await site.login("alice", password)
        assert outcome.reason == "empty-password"
        assert outcome.event["reason"] == "empty-password"
    assert spy.connected == 0


@pytest_twisted.ensureDeferred
async def test_huge_username_is_invalid_username_without_ldap_traffic(ldap, spy):
    """A 100 KB username is refused as invalid-username, audited shortened, and never sent to LDAP."""
    site = ldap(SEARCH_AS_ADMIN)
    outcome = await site.login("a" * 100_000, "alice-pass")
    assert outcome.reason == "invalid-username"
    assert len(outcome.event["username"]) < 1000
    assert spy.connected == 0


# -- home folder from LDAP ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_home_folder_template_with_dashed_attribute(ldap, tmp_path):
    """'ftp-Home-Dir, <tmp>/homes/{ftp_Home_Dir}' gives alice <tmp>/homes/alice-home, created for her."""
    site = ldap(SEARCH_AS_ADMIN + "home_folder_attribute = ftp-Home-Dir, {tmp}/homes/{{ftp_Home_Dir}}\n")
    outcome = await site.login("alice", "alice-pass")
    assert outcome.ok, outcome
    assert outcome.account.home_folder == str(tmp_path / "homes" / "alice-home")
    assert (tmp_path / "homes" / "alice-home").is_dir()


@pytest_twisted.ensureDeferred
async def test_plain_home_directory_attribute_gives_its_absolute_value(ldap):
    """'homeDirectory' alone makes the attribute's absolute value the home folder (/srv/ftp/alice, /srv/ftp/carol)."""
    site = ldap(SEARCH_AS_ADMIN + "home_folder_attribute = homeDirectory\n")
    alice = await site.authenticate("alice", "alice-pass")
    assert alice.ok, alice
    assert alice.account.home_folder == "/srv/ftp/alice"
    carol = await site.authenticate("carol", "carol-pass")
    assert carol.account.home_folder == "/srv/ftp/carol"


@pytest_twisted.ensureDeferred
async def test_without_home_attribute_the_group_home_is_used(ldap):
    """With no home_folder_attribute the primary group's home_folder_path plus the username is the home."""
    site = ldap(SEARCH_AS_ADMIN)
    outcome = await site.login("alice", "alice-pass")
    assert outcome.account.home_folder == str(site.folder / "homes" / "alice")


# -- non-ASCII -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_non_ascii_username_with_comma_and_utf8_password(ldap):
    """parent with username_attribute = cn: 'Müller, Jürgen' binds as cn=Müller\\, Jürgen,... with a UTF-8 password."""
    site = ldap(f"bind_dn_type = parent\nbind_dn = {ENGINEERING}\nusername_attribute = cn")
    outcome = await site.login(JMULLER_CN, "jürgen-päss")
    assert outcome.ok, outcome
    assert binds_of(outcome) == [f"BIND as {JMULLER_DN}: success"]
    assert outcome.account.username == JMULLER_CN
    assert outcome.event["username"] == JMULLER_CN
    assert outcome.account.home_folder == str(site.folder / "homes" / JMULLER_CN)
    wrong = await site.login(JMULLER_CN, "jurgen-pass")
    assert wrong.reason == "invalid-password"


@pytest_twisted.ensureDeferred
async def test_non_ascii_search_by_cn(ldap):
    """search with username_attribute = cn finds 'Müller, Jürgen' and binds as the entry's DN."""
    site = ldap(SEARCH_AS_ADMIN.replace("username_attribute = uid", "username_attribute = cn"))
    outcome = await site.login(JMULLER_CN, "jürgen-päss")
    assert outcome.ok, outcome
    decomposed = unicodedata.normalize("NFD", JMULLER_CN)  # "u" + U+0308, as some keyboards type it
    assert decomposed != JMULLER_CN
    typed_apart = await site.login(decomposed, "jürgen-päss")
    assert typed_apart.ok, typed_apart
    assert typed_apart.account.username == JMULLER_CN  # one account, one home folder
    assert typed_apart.account.home_folder == outcome.account.home_folder
    assert (await site.login(JMULLER_CN, "jürgen-pass")).reason == "invalid-password"


@pytest.mark.parametrize("bind_dn_type", ["parent", "search"])
@pytest_twisted.ensureDeferred
async def test_one_entry_has_one_home_folder_whatever_the_typed_case(ldap, bind_dn_type):
    """'ALICE', ' alice', full-width 'ａｌｉｃｅ' and 'ALİCE' bind as alice's entry (slapd's matching ignores
    case, width and spaces) and must get her name and her one home folder."""
    site = ldap(f"bind_dn_type = {bind_dn_type}\nbind_dn = {ENGINEERING}\nusername_attribute = uid")
    alice = await site.login("alice", "alice-pass")
    for typed in ("ALICE", " alice", "\uff41\uff4c\uff49\uff43\uff45", "AL\u0130CE"):
        variant = await site.login(typed, "alice-pass")
        assert variant.ok, (typed, variant)  # the directory says this is alice
        assert variant.account.dn == ALICE_DN
        assert variant.account.username == "alice"
        assert variant.account.home_folder == alice.account.home_folder


# -- injection ----------------------------------------------------------------------------------------

INJECTIONS = [
    "*",
    "alice)(uid=*",
    "*)(|(uid=*",
    "*)(uid=*))(|(uid=*",
    "\\00",
    "\0",
    "alice\0",
    "alice,ou=Engineering",
    ",cn=admin",
    "alice)(userPassword=alice-pass",
    "*)(userPassword=alice-pass)(uid=*",
    "alice,ou=Engineering\\",
    "alice*",
    "al*ce",
]

INJECTION_SETUPS = {
    "parent-people": f"bind_dn_type = parent\nusername_attribute = uid\nbind_dn =\n    {PEOPLE}\n    {ENGINEERING}",
    "parent-base": f"bind_dn_type = parent\nusername_attribute = uid\nbind_dn =\n    {BASE}\n    {ENGINEERING}",
    "search-admin": SEARCH_AS_ADMIN,
    "search-anonymous": "bind_dn_type = search\nbind_dn = {base}\nusername_attribute = uid",
}


@pytest.mark.parametrize("setup", sorted(INJECTION_SETUPS))
@pytest_twisted.ensureDeferred
async def test_injection_attempts_never_match_another_entry(ldap, slapd, setup):
    """DN and filter metacharacters in the username never reach another entry, even with alice's or the admin's password."""
    site = ldap(INJECTION_SETUPS[setup])
    passwords = ["alice-pass", "alice-pass" + "alice-pass", slapd.admin_password, "x"]
    for username in INJECTIONS:
        for password in passwords:
            outcome = await site.authenticate(username, password)
            assert not outcome.ok, (username, password, outcome)
            assert outcome.reason in ("unknown-user", "invalid-password"), (username, password, outcome)
    # The chain refuses control characters before LDAP; the other attempts are audited as refused.
    for username in INJECTIONS:
        outcome = await site.login(username, "alice-pass")
        assert outcome.event["outcome"] == "failure"
        assert outcome.reason in ("unknown-user", "invalid-password", "invalid-username"), (username, outcome)
    assert (await site.login("alice", "alice-pass")).ok  # the setup itself works


@pytest_twisted.ensureDeferred
async def test_parent_dn_injection_is_escaped_in_the_bind(ldap):
    """With parent, 'alice,ou=Engineering' is bound as one escaped RDN value, not as alice's real DN."""
    site = ldap(f"bind_dn_type = parent\nbind_dn = {PEOPLE}\nusername_attribute = uid")
    outcome = await site.authenticate("alice,ou=Engineering", "alice-pass")
    assert outcome.reason == "unknown-user"
    assert binds_of(outcome)[0].startswith(rf"BIND as uid=alice\,ou\=Engineering,{PEOPLE}: ")


# -- the Web Manager path ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_manager_login_denied_without_manager_search_filter(ldap, spy):
    """With an empty manager_search_filter a Web Manager login is manager-denied without contacting LDAP."""
    site = ldap(SEARCH_AS_ADMIN)
    outcome = await site.authenticate("alice", "alice-pass", manager=True)
    assert outcome.reason == "manager-denied"
    assert spy.connected == 0


@pytest.mark.parametrize("setup", ["search", "parent"])
@pytest_twisted.ensureDeferred
async def test_manager_search_filter_accepts_admins_only(ldap, setup):
    """manager_search_filter (memberOf=cn=admins,...) accepts alice and refuses carol with filter-mismatch."""
    if setup == "search":
        options = SEARCH_AS_ADMIN
    else:
        options = f"bind_dn_type = parent\nusername_attribute = uid\nbind_dn =\n    {ENGINEERING}\n    {CONTRACTORS}"
    site = ldap(options + f"\nmanager_search_filter = (memberOf={ADMINS})\nsearch_filter = (memberOf={FTP_USERS})\n")
    alice = await site.authenticate("alice", "alice-pass", manager=True)
    assert alice.ok, alice
    assert alice.account.dn == ALICE_DN
    assert alice.account.home_folder == ""
    carol = await site.authenticate("carol", "carol-pass", manager=True)
    assert carol.reason == "filter-mismatch"
    # carol may still use file transfer: search_filter, not manager_search_filter, applies there.
    assert (await site.authenticate("carol", "carol-pass")).ok
    assert (await site.authenticate("alice", "bob-pass", manager=True)).reason == "invalid-password"


# -- connections are closed ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "username, password, reason",
    [
        ("alice", "alice-pass", ""),
        ("alice", "wrong", "invalid-password"),
        ("nobody", "wrong", "unknown-user"),
        ("bob", "bob-pass", "filter-mismatch"),
        ("dup", "dup-pass", "ambiguous-user"),
        ("carol", "carol-pass", "home-folder-invalid"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_every_login_unbinds_and_closes(ldap, spy, slapd, username, password, reason):
    """Whatever the outcome, the one LDAP connection of a login is closed with UNBIND."""
    site = ldap(
        SEARCH_AS_ADMIN.replace("{base}", PEOPLE + "\n    " + CONTRACTORS)
        + f"search_filter = (|(memberOf={FTP_USERS})(uid=dup))\n"
        + "home_folder_attribute = ftp-Home-Dir, {tmp}/homes/{{ftp_Home_Dir}}\n"
    )
    outcome = await site.login(username, password)
    assert outcome.reason == reason, outcome
    await spy.settle()
    assert (spy.connected, spy.unbinds, spy.open) == (1, 1, 0)
    assert await connections_left(slapd.port, os.getpid()) == []


@pytest_twisted.ensureDeferred
async def test_server_that_never_answers_costs_one_timeout_and_is_closed(slapd, tmp_path, spy):
    """A server that accepts TCP but never answers the BIND gives service-unavailable after timeout, and the connection is closed."""
    from twisted.internet import protocol, reactor

    accepted, closed = [], []

    class Silent(protocol.Protocol):
        def connectionMade(self):
            accepted.append(self)

        def connectionLost(self, reason=None):
            closed.append(self)

    factory = protocol.ServerFactory()
    factory.protocol = Silent
    listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
    site = InProcessLDAP(
        slapd,
        tmp_path / "silent",
        f"bind_dn_type = parent\nbind_dn = {ENGINEERING}\nusername_attribute = uid\ntimeout = 1",
        port=listening.getHost().port,
    )
    try:
        started = time.monotonic()
        outcome = await site.login("alice", "alice-pass")
        elapsed = time.monotonic() - started
        assert outcome.reason == "service-unavailable", outcome
        assert 0.9 < elapsed < 3
        await spy.settle()
        assert spy.connected >= 1 and spy.open == 0
        for _ in range(250):
            if len(closed) == len(accepted):
                break
            await task.deferLater(reactor, 0.02, lambda: None)
        assert accepted and len(closed) == len(accepted)
    finally:
        site.close()
        await listening.stopListening()


@pytest_twisted.ensureDeferred
async def test_no_leak_after_a_thousand_logins(slapd, tmp_path, spy):
    """1,000 logins (successes and each kind of failure) leave no file descriptor or connection behind."""
    closed = free_port()
    site = InProcessLDAP(
        slapd,
        tmp_path / "many",
        SEARCH_AS_ADMIN.format(base=BASE, admin_dn=slapd.admin_dn, admin_password=slapd.admin_password)
        + f"search_filter = (memberOf={FTP_USERS})\n",
        extra=ldap_section(
            slapd, f"bind_dn_type = parent\nbind_dn = {ENGINEERING}\nusername_attribute = uid", "down", port=closed
        ),
    )
    attempts = [
        ("alice", "alice-pass", "ldap", ""),
        ("alice", "wrong-pass", "ldap", "invalid-password"),
        ("nobody", "wrong-pass", "ldap", "unknown-user"),
        ("bob", "bob-pass", "ldap", "filter-mismatch"),
        ("alice", "alice-pass", "down", "service-unavailable"),
    ]
    try:
        # Warm up (first connection, lazily created objects) before the baseline.
        for username, password, method_id, _ in attempts:
            await site.authenticate(username, password, method_id=method_id)
        await spy.settle()
        fds_before = open_fds()
        started = time.monotonic()
        reasons: dict[str, int] = {}
        total = 1000
        batch = 20
        for first in range(0, total, batch):
            outcomes = await defer.gatherResults(
                [
                    defer.ensureDeferred(site.authenticate(*attempts[n % len(attempts)][:2], method_id=attempts[n % len(attempts)][2]))
                    for n in range(first, first + batch)
                ]
            )
            for n, outcome in zip(range(first, first + batch), outcomes):
                assert outcome.reason == attempts[n % len(attempts)][3], outcome
                reasons[outcome.reason] = reasons.get(outcome.reason, 0) + 1
        elapsed = time.monotonic() - started
        assert elapsed < 60, f"1,000 logins took {elapsed:.1f}s"
        assert sum(reasons.values()) == total
        await spy.settle()
        assert spy.open == 0
        assert spy.unbinds == spy.connected  # one UNBIND per connection, success or not
        assert await connections_left(slapd.port, os.getpid()) == []
        assert open_fds() - fds_before <= 5
    finally:
        site.close()


# -- real FTP and SFTP logins ---------------------------------------------------------------------------


class LDAPSite:
    """A real sftpauth process: FTP and SFTP on the slapd-backed ldap method, and an FTP service on a dead LDAP."""

    def __init__(self, folder: Path, slapd):
        self.folder = folder
        self.homes = folder / "homes"
        self.ftp_port = free_port()
        self.sftp_port = free_port()
        self.down_port = free_port()
        while len({self.ftp_port, self.sftp_port, self.down_port}) < 3:
            self.sftp_port, self.down_port = free_port(), free_port()
        self.closed_ldap_port = free_port()
        config = f"""
[server]
authentications = ldap
audit_log = {folder}/audit.jsonl

[security-policies/DEFAULT-SECURITY-POLICY]
source_ip_ban_after_count = 1000

[services/ftp-ldap]
type = ftp
address = 127.0.0.1
port = {self.ftp_port}

[services/sftp-ldap]
type = ssh
address = 127.0.0.1
port = {self.sftp_port}

[services/ftp-down]
type = ftp
address = 127.0.0.1
port = {self.down_port}
authentications = ldap-down

[groups/ldap-users]
home_folder_path = {self.homes}
create_home_folder = yes

[authentications/ldap]
type = ldap
address = 127.0.0.1
port = {slapd.port}
bind_dn_type = search
bind_dn = {BASE}
username_attribute = uid
service_account_dn = {slapd.admin_dn}
service_account_password = {slapd.admin_password}
search_filter = (memberOf={FTP_USERS})
home_folder_attribute = ftp-Home-Dir, {self.homes}/{{ftp_Home_Dir}}
base_groups = ldap-users

[authentications/ldap-down]
type = ldap
address = 127.0.0.1
port = {self.closed_ldap_port}
bind_dn = {PEOPLE}
username_attribute = uid
base_groups = ldap-users
"""
        self.server = SftpauthServer(folder, config, ports=(self.ftp_port, self.sftp_port, self.down_port))

    def ftp(self, username: str, password: str, port: int = 0) -> ftplib.FTP:
        client = ftplib.FTP(timeout=TIMEOUT, encoding="utf-8")
        client.connect("127.0.0.1", port or self.ftp_port)
        try:
            client.login(username, password)
        except BaseException:
            client.close()
            raise
        return client

    def sftp_transport(self, username: str, password: str) -> paramiko.Transport:
        transport = paramiko.Transport(("127.0.0.1", self.sftp_port))
        try:
            transport.connect(username=username, password=password)
        except BaseException:
            transport.close()
            raise
        return transport

    def events_for(self, username: str, service: str) -> list[dict]:
        return [
            event
            for event in self.server.audit_events()
            if event.get("event") == "authentication" and event.get("username") == username and event.get("service") == service
        ]

    def wait_for_login(self, username: str, service: str, already: int, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            events = self.events_for(username, service)
            if len(events) > already:
                return events[already]
            if time.monotonic() > deadline:
                raise AssertionError(f"no new login event for {username!r} on {service}: {self.server.audit_events()[-5:]}")
            time.sleep(0.05)


@pytest.fixture(scope="module")
def site(slapd, tmp_path_factory):
    """One real sftpauth process for every service test of this module."""
    site = LDAPSite(tmp_path_factory.mktemp("ldap-site"), slapd)
    with serving(site.server):
        yield site


def test_ftp_login_uses_the_ldap_home_folder(site):
    """alice logs in over FTP through LDAP; a file she uploads lands in <homes>/alice-home from ftp-Home-Dir."""
    already = len(site.events_for("alice", "ftp-ldap"))
    client = site.ftp("alice", "alice-pass")
    try:
        assert client.pwd() == "/"
        client.storbinary("STOR from-ftp.txt", io.BytesIO(b"uploaded over FTP\n"))
        assert "from-ftp.txt" in client.nlst()
    finally:
        client.quit()
    assert (site.homes / "alice-home" / "from-ftp.txt").read_bytes() == b"uploaded over FTP\n"
    event = site.wait_for_login("alice", "ftp-ldap", already)
    assert (event["outcome"], event["method"], event["protocol"]) == ("success", "ldap", "ftp")


def test_sftp_login_uses_the_ldap_home_folder(site):
    """alice logs in over SFTP through LDAP; a file she uploads lands in <homes>/alice-home from ftp-Home-Dir."""
    already = len(site.events_for("alice", "sftp-ldap"))
    transport = site.sftp_transport("alice", "alice-pass")
    try:
        client = paramiko.SFTPClient.from_transport(transport)
        assert client.normalize(".") == "/"
        with client.open("from-sftp.txt", "wb") as remote:
            remote.write(b"uploaded over SFTP\n")
        assert "from-sftp.txt" in client.listdir(".")
        client.close()
    finally:
        transport.close()
    assert (site.homes / "alice-home" / "from-sftp.txt").read_bytes() == b"uploaded over SFTP\n"
    event = site.wait_for_login("alice", "sftp-ldap", already)
    assert (event["outcome"], event["method"]) == ("success", "ldap")


FAILURES = [
    ("alice", "not-alice-pass", "invalid-password"),
    ("nobody", "nobody-pass", "unknown-user"),
    ("bob", "bob-pass", "filter-mismatch"),
    ("jmuller", "jürgen-päss", "home-folder-invalid"),
    ("carol", "carol-pass", "home-folder-invalid"),
    ("alice", "", "empty-password"),
    ("*", "alice-pass", "unknown-user"),
    ("alice)(uid=*", "alice-pass", "unknown-user"),
]


@pytest.mark.parametrize("username, password, reason", FAILURES)
def test_ftp_login_failures_are_audited(site, username, password, reason):
    """A refused FTP login answers 530 and the audit log has the reason."""
    already = len(site.events_for(username, "ftp-ldap"))
    with pytest.raises(ftplib.error_perm) as caught:
        site.ftp(username, password)
    assert str(caught.value).startswith("530")
    event = site.wait_for_login(username, "ftp-ldap", already)
    assert (event["outcome"], event["reason"]) == ("failure", reason)
    assert not (site.homes / "etc").exists()


@pytest.mark.parametrize("username, password, reason", FAILURES[:6])
def test_sftp_login_failures_are_audited(site, username, password, reason):
    """A refused SFTP login fails authentication and the audit log has the reason."""
    already = len(site.events_for(username, "sftp-ldap"))
    with pytest.raises(paramiko.AuthenticationException):
        site.sftp_transport(username, password)
    event = site.wait_for_login(username, "sftp-ldap", already)
    assert (event["outcome"], event["reason"]) == ("failure", reason)


def test_ftp_with_ldap_down_is_service_unavailable(site):
    """With its LDAP server on a closed port the FTP service refuses at once, with service-unavailable."""
    already = len(site.events_for("alice", "ftp-down"))
    started = time.monotonic()
    with pytest.raises(ftplib.error_perm):
        site.ftp("alice", "alice-pass", port=site.down_port)
    assert time.monotonic() - started < 3
    event = site.wait_for_login("alice", "ftp-down", already)
    assert (event["outcome"], event["reason"], event["method"]) == ("failure", "service-unavailable", "ldap-down")


def test_sftp_huge_username_is_invalid_username_and_the_service_survives(site):
    """A 100 KB SFTP username is audited (shortened) as invalid-username, and alice can still log in after it."""

    def huge(event: dict) -> bool:
        return event.get("service") == "sftp-ldap" and event.get("username", "").startswith("u" * 256)

    already = sum(1 for event in site.server.audit_events() if huge(event))
    with pytest.raises((paramiko.SSHException, EOFError, OSError)):
        site.sftp_transport("u" * 100_000, "alice-pass")
    deadline = time.monotonic() + TIMEOUT
    while sum(1 for event in site.server.audit_events() if huge(event)) <= already and time.monotonic() < deadline:
        time.sleep(0.05)
    event = [event for event in site.server.audit_events() if huge(event)][already]
    assert (event["outcome"], event["reason"]) == ("failure", "invalid-username")
    assert len(event["username"]) < 1000
    site.sftp_transport("alice", "alice-pass").close()
    # Neither the audit copy nor conch's debug lines ("trying auth") put it in the server log.
    assert "u" * 1000 not in site.server.log_text()


def test_the_server_reuses_a_few_ldap_connections(site, slapd):
    """After the logins above the process keeps a few connections to slapd (at most connection_pool_size = 16),
    and ten more sequential logins open none."""
    pid = site.server.process.pid

    def local_ends() -> set[str]:
        return {line.split()[3] for line in connections_to(slapd.port, pid)}

    kept = local_ends()
    assert 1 <= len(kept) <= 16, kept
    for _ in range(10):
        site.ftp("alice", "alice-pass").quit()
    assert local_ends() == kept
