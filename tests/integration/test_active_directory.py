"""Active Directory (SPEC §3 direct-username, error-49 sub-codes, memberOf, nested groups) against a real Samba AD DC.

The DC (tests/integration/samba.py, one per test session) holds the accounts
of data/active-directory.ldif. In-process tests run the real loader,
LDAPMethod and AuthenticationChain on the test's reactor and read each
login's audit event back from the audit log; the service tests run one real
``twistd -n sftpauth`` with an FTP service (down-level ``AD\\user`` logins)
and an SFTP service (UPN logins), and ``sftpauth test-login`` is run as a
command.
"""

from __future__ import annotations

import ftplib
import io
import subprocess
import sys
from pathlib import Path

import paramiko
import pytest
import pytest_twisted
from ldaptor.protocols import pureldap

from sftpauth.auth.ldap.client import Connector, ServerAddress
from sftpauth.auth.ldap.dn import complete_ranged_values
from sftpauth.auth.ldap.filters import MATCH_ALL
from sftpauth.auth.ldap.tls import TLSPolicy

from .ldap_helpers import InProcessLDAP
from .policy_helpers import ftp_login
from .samba import SambaDC
from .server import SftpauthServer, free_port, serving
from .sftp_fixtures import count_events, login_event, ssh_transport, wait_for_new_event

pytestmark = pytest.mark.samba

SFTPAUTH = str(Path(sys.executable).with_name("sftpauth"))
TIMEOUT = 10
DOMAIN_DN = "DC=ad,DC=example,DC=com"
FTP_USERS = f"OU=FTP Users,{DOMAIN_DN}"
GROUPS = f"OU=Groups,{DOMAIN_DN}"
ALICE_DN = f"CN=Alice Adams,{FTP_USERS}"
BOB_DN = f"CN=Bob Brown,{FTP_USERS}"
FTP_READERS = f"CN=FTP Readers,{GROUPS}"
FTP_WRITERS = f"CN=FTP Writers,{GROUPS}"
PASSWORDS = {
    "alice": "Alice-Pass-1",
    "bob": "Bob-Pass-1",
    "carol": "Carol-Pass-1",
    "dave": "Dave-Pass-1",
    "eve": "Eve-Pass-1",
    "mia": "Mia-Pass-1",
    "lou": "Lou-Pass-1",
}

UPN = f"""
bind_dn_type = direct-username
bind_dn = {FTP_USERS}
username_attribute = userPrincipalName
"""
SAM = f"""
bind_dn_type = direct-username
bind_dn = {FTP_USERS}
username_attribute = sAMAccountName
"""
# memberOf DNs hold commas: exact DNs are written g/.../ (docs/configuration.rst)
MAPPING = f"""
base_groups =
group_mapping =
    memberOf, g/{FTP_WRITERS}/, writers
    memberOf, g/{FTP_READERS}/, readers
"""
GROUP_SECTIONS = """
[groups/DEFAULT_GROUP]
home_folder_path = {homes}
create_home_folder = yes

[groups/writers]
home_folder_path = {homes}
create_home_folder = yes

[groups/readers]
home_folder_path = {homes}
create_home_folder = yes
permissions = allow-read, allow-list
"""


def dc_options(samba_dc, options: str, port: int = 0) -> str:
    return f"address = {samba_dc.host}\nport = {port or samba_dc.port}\n" + options


@pytest.fixture
def ad(samba_dc, tmp_path):
    """Build an in-process ldap method and chain against the DC from an options snippet."""
    made = []

    def make(options: str, extra: str = "", port: int = 0) -> InProcessLDAP:
        folder = tmp_path / f"site{len(made)}"
        extra = extra.format(homes=folder / "homes")
        harness = InProcessLDAP(samba_dc, folder, dc_options(samba_dc, options, port), extra)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()


def steps(outcome, action: str) -> list[str]:
    return [step.detail for step in outcome.trace.steps if step.action == action]


# -- logins --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_upn_login_binds_as_typed_and_reads_the_entry(ad):
    """alice@ad.example.com binds as typed; her entry is found by userPrincipalName under the OU."""
    site = ad(UPN + "email_attribute = mail\nfull_name_attribute = displayName")
    outcome = await site.login("alice@ad.example.com", PASSWORDS["alice"])
    assert outcome.ok, outcome
    assert outcome.account.dn == ALICE_DN
    assert outcome.account.username == "alice@ad.example.com"
    assert (outcome.account.email, outcome.account.full_name) == ("alice@ad.example.com", "Alice Adams")
    assert steps(outcome, "bind") == ["BIND as 'alice@ad.example.com': success"]
    assert any("(userPrincipalName=alice@ad.example.com)" in step and "1 entry" in step for step in steps(outcome, "search"))
    assert (outcome.event["outcome"], outcome.event["reason"]) == ("success", "")


@pytest_twisted.ensureDeferred
async def test_down_level_login_searches_the_user_part_as_sam_account_name(ad):
    """AD\\bob binds as typed and the entry is found by sAMAccountName=bob; the account is named bob, whatever the case typed."""
    site = ad(SAM)
    outcome = await site.login("AD\\bob", PASSWORDS["bob"])
    assert outcome.ok, outcome
    assert outcome.account.dn == BOB_DN
    assert outcome.account.username == "bob"
    assert steps(outcome, "bind") == ["BIND as 'AD\\bob': success"]
    assert any("(sAMAccountName=bob)" in step for step in steps(outcome, "search"))
    shouting = await site.login("ad\\BOB", PASSWORDS["bob"])
    assert shouting.ok, shouting
    assert shouting.account.username == "bob"


@pytest_twisted.ensureDeferred
async def test_username_suffix_turns_a_plain_name_into_the_upn(ad):
    """With username_suffix = @ad.example.com, 'alice' binds as alice@ad.example.com and is found as sAMAccountName=alice."""
    site = ad(SAM + "username_suffix = @ad.example.com")
    outcome = await site.login("alice", PASSWORDS["alice"])
    assert outcome.ok, outcome
    assert outcome.account.dn == ALICE_DN
    assert outcome.account.username == "alice"
    assert steps(outcome, "bind") == ["BIND as 'alice@ad.example.com': success"]


@pytest_twisted.ensureDeferred
async def test_with_username_suffix_a_full_upn_is_bound_as_typed(ad):
    """With userPrincipalName and username_suffix, 'alice' and 'Alice@AD.example.com' are one account; a typed UPN gets no second suffix."""
    site = ad(UPN + "username_suffix = @ad.example.com")
    bare = await site.login("alice", PASSWORDS["alice"])
    typed = await site.login("Alice@AD.example.com", PASSWORDS["alice"])
    assert bare.ok and typed.ok, (bare, typed)
    assert bare.account.username == typed.account.username == "alice@ad.example.com"
    assert steps(typed, "bind") == ["BIND as 'Alice@AD.example.com': success"]


@pytest.mark.parametrize(
    "username, password, reason, code",
    [
        ("alice@ad.example.com", "not-her-password", "invalid-password", "52e"),
        ("dave@ad.example.com", PASSWORDS["dave"], "account-disabled", "533"),
        ("mia@ad.example.com", PASSWORDS["mia"], "password-must-change", "773"),
        ("eve@ad.example.com", PASSWORDS["eve"], "account-expired", "701"),
        ("AD\\dave", PASSWORDS["dave"], "account-disabled", "533"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_error_49_sub_codes_become_audit_reasons(ad, username, password, reason, code):
    """Samba answers error 49 with AD's 'data XXX' sub-code; each becomes its own audit reason."""
    site = ad(UPN)
    outcome = await site.login(username, password)
    assert outcome.reason == reason, outcome
    assert (outcome.event["outcome"], outcome.event["reason"]) == ("failure", reason)
    (bind,) = steps(outcome, "bind")
    assert f"data {code}" in bind
    assert password not in str(outcome.event)


@pytest_twisted.ensureDeferred
async def test_a_locked_out_account_is_account_locked_even_with_the_right_password(ad, samba_dc):
    """With lockoutThreshold = 3, lou's three wrong passwords lock him out: then even his own password is account-locked (775)."""
    site = ad(UPN)
    threshold = "dn: {base}\nchangetype: modify\nreplace: lockoutThreshold\nlockoutThreshold: {count}\n"
    samba_dc.modify(threshold.format(base=DOMAIN_DN, count=3))
    try:
        wrong = [await site.login("lou@ad.example.com", f"wrong-{number}") for number in range(3)]
        assert [outcome.reason for outcome in wrong] == ["invalid-password"] * 3
        locked = await site.login("lou@ad.example.com", PASSWORDS["lou"])
    finally:
        samba_dc.modify(threshold.format(base=DOMAIN_DN, count=0))
    assert locked.reason == "account-locked", locked
    assert locked.event["reason"] == "account-locked"
    assert "data 775" in steps(locked, "bind")[0]


@pytest_twisted.ensureDeferred
async def test_a_upn_held_by_another_account_never_logs_into_the_samaccountname_entry(ad, samba_dc):
    """carol holds the UPN bob@example.com: 'bob' + that suffix with carol's password binds as carol, finds bob's entry, and is refused."""
    site = ad(SAM + "username_suffix = @example.com")
    carol_dn = f"CN=Carol Contractor,OU=Contractors,{DOMAIN_DN}"
    upn = "dn: {dn}\nchangetype: modify\nreplace: userPrincipalName\nuserPrincipalName: {upn}\n"
    threshold = "dn: {base}\nchangetype: modify\nreplace: lockoutThreshold\nlockoutThreshold: {count}\n"
    samba_dc.modify(upn.format(dn=carol_dn, upn="bob@example.com"))
    samba_dc.modify(threshold.format(base=DOMAIN_DN, count=3))
    try:
        outcomes = [await site.login("bob", PASSWORDS["carol"]) for _ in range(3)]
        # QA against Samba: a BIND as bob's DN with carol's password made each of these a bad password of bob's,
        # and the third locked bob out. The directory now says who holds the UPN: no BIND as bob.
        bob = await site.login("AD\\bob", PASSWORDS["bob"])
    finally:
        samba_dc.modify(threshold.format(base=DOMAIN_DN, count=0))
        samba_dc.modify(upn.format(dn=carol_dn, upn="carol@ad.example.com"))
    outcome = outcomes[0]
    assert steps(outcome, "bind") == ["BIND as 'bob@example.com': success"]  # AD took it as carol's UPN
    assert steps(outcome, "verify") == [f"'bob@example.com' is the UPN of {carol_dn}, another account"]
    assert [attempt.reason for attempt in outcomes] == ["account-mismatch"] * 3, outcomes
    assert outcome.event["reason"] == "account-mismatch"
    assert BOB_DN in outcome.failure.explanation
    # Not locked out; AD\bob is this domain's bob, as its crossRef's NetBIOS name says (one BIND again).
    assert bob.reason == "", bob
    assert steps(bob, "bind") == ["BIND as 'AD\\bob': success"]
    assert steps(bob, "verify") == ["'AD' is the domain of the entry found (AD)"]


@pytest_twisted.ensureDeferred
async def test_a_user_outside_the_ou_is_refused(ad):
    """carol's password is right, but she is in OU=Contractors, not under bind_dn: refused as outside-base-dn."""
    site = ad(UPN)
    outcome = await site.login("carol@ad.example.com", PASSWORDS["carol"])
    assert outcome.reason == "outside-base-dn", outcome
    assert outcome.event["reason"] == "outside-base-dn"
    assert FTP_USERS in outcome.failure.explanation
    assert steps(outcome, "bind") == ["BIND as 'carol@ad.example.com': success"]
    whole_domain = ad(UPN.replace(FTP_USERS, DOMAIN_DN))
    assert (await whole_domain.login("carol@ad.example.com", PASSWORDS["carol"])).ok


@pytest_twisted.ensureDeferred
async def test_search_filter_on_member_of(ad):
    """search_filter = (memberOf=CN=FTP Readers,...) lets alice in and refuses bob; AD's in-chain rule in it matches nested members."""
    site = ad(UPN.replace(FTP_USERS, DOMAIN_DN) + f"search_filter = (memberOf={FTP_READERS})")
    assert (await site.login("alice@ad.example.com", PASSWORDS["alice"])).ok
    bob = await site.login("bob@ad.example.com", PASSWORDS["bob"])
    assert bob.reason == "filter-mismatch", bob
    nested = ad(UPN + f"search_filter = (memberOf:1.2.840.113556.1.4.1941:={FTP_WRITERS})")
    assert (await nested.login("bob@ad.example.com", PASSWORDS["bob"])).ok  # a member through two groups
    assert (await nested.login("alice@ad.example.com", PASSWORDS["alice"])).reason == "filter-mismatch"


# -- groups ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_group_mapping_on_member_of_dns(ad):
    """alice's memberOf holds CN=FTP Readers,...: group_mapping gives her the readers group."""
    site = ad(UPN + MAPPING, GROUP_SECTIONS)
    outcome = await site.login("alice@ad.example.com", PASSWORDS["alice"])
    assert outcome.ok, outcome
    assert outcome.account.groups[0] == "readers"


@pytest_twisted.ensureDeferred
async def test_nested_groups_through_two_levels_with_one_in_chain_search(ad):
    """bob is in Team Blue, in Engineering, in FTP Writers: nested_groups = yes finds it with one in-chain search."""
    without = ad(UPN + MAPPING, GROUP_SECTIONS)
    flat = await without.login("bob@ad.example.com", PASSWORDS["bob"])
    assert flat.ok, flat
    assert flat.account.groups == ("DEFAULT_GROUP",)
    site = ad(UPN + MAPPING + f"nested_groups = yes\ngroup_search_base = {GROUPS}", GROUP_SECTIONS)
    outcome = await site.login("bob@ad.example.com", PASSWORDS["bob"])
    assert outcome.ok, outcome
    assert outcome.account.groups[0] == "writers"
    searches = [step for step in steps(outcome, "groups") if ": search (" in step]
    assert len(searches) == 1, steps(outcome, "groups")
    assert f"(member:1.2.840.113556.1.4.1941:={BOB_DN})" in searches[0]
    assert "3 group(s)" in searches[0]


@pytest_twisted.ensureDeferred
async def test_referrals_in_search_results_are_ignored(ad):
    """A group search from the domain root meets Samba's continuation reference to CN=Configuration: not chased, the groups still count."""
    site = ad(UPN + MAPPING + f"nested_groups = yes\ngroup_search_base = {DOMAIN_DN}", GROUP_SECTIONS)
    outcome = await site.login("bob@ad.example.com", PASSWORDS["bob"])
    assert outcome.ok, outcome
    assert outcome.account.groups[0] == "writers"
    assert any("referral" in step and "not followed" in step for step in steps(outcome, "groups")), outcome


@pytest_twisted.ensureDeferred
async def test_ranged_member_of_values_are_read_to_the_end(samba_dc):
    """A memberOf answered as memberOf;range=0-1 is completed with memberOf;range=2-* requests, as AD does past 1,500 values."""
    from twisted.internet import reactor

    connector = Connector(reactor, TIMEOUT, TLSPolicy("no", "system"))
    connection = await connector.open(ServerAddress(samba_dc.host, samba_dc.port))
    try:
        assert (await connection.bind(samba_dc.admin, samba_dc.admin_password)).ok
        _, (entry,) = await connection.search(ALICE_DN, pureldap.LDAP_SCOPE_baseObject, MATCH_ALL, ["memberOf;range=0-1"])
        assert "memberof;range=0-1" in entry.attributes
        complete = await complete_ranged_values(connection, entry)
    finally:
        connection.close()
    assert sorted(complete.get("memberOf")) == sorted(
        [FTP_READERS, f"CN=VPN Users,{GROUPS}", f"CN=Printers,{GROUPS}"]
    )


# -- home folder, LDAPS ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ms_iis_ftp_dir_with_backslashes_is_a_home_folder(ad, tmp_path):
    """msIIS-FTPDir 'homes\\alice' in the template /srv/{msIIS_FTPDir} gives <srv>/homes/alice."""
    site = ad(UPN + f"home_folder_attribute = msIIS-FTPDir, {tmp_path}/srv/{{msIIS_FTPDir}}")
    outcome = await site.authenticate("alice@ad.example.com", PASSWORDS["alice"])
    assert outcome.ok, outcome
    assert outcome.account.home_folder == str(tmp_path / "srv" / "homes" / "alice")


@pytest_twisted.ensureDeferred
async def test_ldaps_with_the_domain_ca(ad, samba_dc):
    """LDAPS on 636 with tls_trusted_certificates = the domain's CA: the certificate is checked and the login works."""
    options = UPN + f"secure_connection = yes\ntls_trusted_certificates = {samba_dc.ca_certificate}"
    site = ad(options, port=samba_dc.ldaps_port)
    outcome = await site.login("alice@ad.example.com", PASSWORDS["alice"])
    assert outcome.ok, outcome
    assert any("LDAPS" in step for step in steps(outcome, "connect")), outcome


@pytest.fixture(scope="module")
def strict_dc(samba_dc):
    """A second DC that wants TLS for simple binds (Samba's default; AD's 'LDAP server signing requirements')."""
    with SambaDC(samba_dc.template, options=["ldap server require strong auth = yes"]) as dc:
        yield dc


@pytest_twisted.ensureDeferred
async def test_a_dc_that_requires_tls_refuses_plain_binds_and_says_what_to_do(strict_dc, tmp_path):
    """A plain simple BIND gets result 8 (ldap-error, the trace says to use TLS); StartTLS on 389 with the domain CA logs in."""
    plain = InProcessLDAP(strict_dc, tmp_path / "plain", dc_options(strict_dc, UPN))
    starttls = InProcessLDAP(
        strict_dc,
        tmp_path / "starttls",
        dc_options(strict_dc, UPN + f"secure_connection = starttls\ntls_trusted_certificates = {strict_dc.ca_certificate}"),
    )
    try:
        refused = await plain.login("alice@ad.example.com", PASSWORDS["alice"])
        assert refused.reason == "ldap-error", refused
        assert "stronger authentication required (8; use secure_connection = yes or starttls)" in refused.failure.explanation
        accepted = await starttls.login("alice@ad.example.com", PASSWORDS["alice"])
        assert accepted.ok, accepted
        assert any("StartTLS" in step for step in steps(accepted, "connect")), accepted
    finally:
        plain.close()
        starttls.close()


# -- a real sftpauth: FTP with AD\user, SFTP with UPNs, and sftpauth test-login ------------------------------


class ADSite:
    """One real ``twistd -n sftpauth``: FTP on ad-sam (``AD\\user``), SFTP on ad-upn (``user@ad.example.com``)."""

    def __init__(self, folder: Path, samba_dc):
        self.folder = folder
        self.srv = folder / "srv"
        (self.srv / "homes" / "alice").mkdir(parents=True)
        (self.srv / "homes" / "alice" / "report.txt").write_bytes(b"for alice\n")
        self.ftp_port = free_port()
        self.sftp_port = free_port()
        while self.sftp_port == self.ftp_port:
            self.sftp_port = free_port()
        method = f"""\
type = ldap
address = {samba_dc.host}
port = {samba_dc.port}
timeout = 5
bind_dn_type = direct-username
bind_dn = {FTP_USERS}
home_folder_attribute = msIIS-FTPDir, {self.srv}/{{msIIS_FTPDir}}
nested_groups = yes
group_search_base = {GROUPS}
group_mapping =
    memberOf, g/{FTP_WRITERS}/, writers
    memberOf, g/{FTP_READERS}/, readers
"""
        config = f"""\
[server]
authentications = ad-upn
audit_log = {folder}/audit.jsonl

[security-policies/DEFAULT-SECURITY-POLICY]
source_ip_ban_after_count = 1000

[services/ftp-ad]
type = ftp
address = 127.0.0.1
port = {self.ftp_port}
authentications = ad-sam

[services/sftp-ad]
type = ssh
address = 127.0.0.1
port = {self.sftp_port}
authentications = ad-upn

[groups/writers]
home_folder_path = {self.srv}
create_home_folder = yes

[groups/readers]
home_folder_path = {self.srv}
permissions = allow-read, allow-list

[authentications/ad-upn]
username_attribute = userPrincipalName
{method}
[authentications/ad-sam]
username_attribute = sAMAccountName
{method}"""
        self.server = SftpauthServer(folder, config, ports=(self.ftp_port, self.sftp_port))

    def ftp(self, username: str, password: str) -> ftplib.FTP:
        return ftp_login(self.ftp_port, username, password, "127.0.0.1")

    def count(self, username: str, service: str) -> int:
        return count_events(self.server, self._event_of(username, service))

    def login_event(self, username: str, service: str, already: int) -> dict:
        """The login event after the ``already`` ones of ``username`` on ``service``, once written."""
        return wait_for_new_event(self.server, self._event_of(username, service), already, TIMEOUT)

    @staticmethod
    def _event_of(username: str, service: str):
        return lambda event: login_event(username)(event) and event.get("service") == service


@pytest.fixture(scope="module")
def site(samba_dc, tmp_path_factory):
    """One real sftpauth process for the service tests of this module."""
    site = ADSite(tmp_path_factory.mktemp("ad-site"), samba_dc)
    with serving(site.server):
        yield site


def test_ftp_down_level_login_of_a_nested_group_member_writes_in_its_ms_iis_ftp_dir(site):
    """AD\\bob logs in over FTP, is a writer through two nested groups, and his upload lands in <srv>/homes/bob."""
    already = site.count("AD\\bob", "ftp-ad")
    client = site.ftp("AD\\bob", PASSWORDS["bob"])
    try:
        client.storbinary("STOR from-ftp.txt", io.BytesIO(b"over FTP\n"))
        assert "from-ftp.txt" in client.nlst()
    finally:
        client.quit()
    assert (site.srv / "homes" / "bob" / "from-ftp.txt").read_bytes() == b"over FTP\n"
    event = site.login_event("AD\\bob", "ftp-ad", already)
    assert (event["outcome"], event["method"]) == ("success", "ad-sam")


def test_sftp_upn_login_of_a_reader(site):
    """alice@ad.example.com logs in over SFTP as a reader (memberOf FTP Readers): she reads her file and cannot write."""
    already = site.count("alice@ad.example.com", "sftp-ad")
    with ssh_transport(site.sftp_port, "alice@ad.example.com", PASSWORDS["alice"]) as transport:
        client = paramiko.SFTPClient.from_transport(transport)
        with client.open("report.txt", "rb") as remote:
            assert remote.read() == b"for alice\n"
        with pytest.raises(IOError):
            with client.open("upload.txt", "wb") as remote:
                remote.write(b"no\n")
        client.close()
    assert not (site.srv / "homes" / "alice" / "upload.txt").exists()
    event = site.login_event("alice@ad.example.com", "sftp-ad", already)
    assert (event["outcome"], event["method"]) == ("success", "ad-upn")


@pytest.mark.parametrize(
    "username, password, reason",
    [
        ("AD\\alice", "not-her-password", "invalid-password"),
        ("AD\\dave", PASSWORDS["dave"], "account-disabled"),
        ("AD\\mia", PASSWORDS["mia"], "password-must-change"),
        ("AD\\carol", PASSWORDS["carol"], "outside-base-dn"),
    ],
)
def test_ftp_refusals_carry_the_ad_reason(site, username, password, reason):
    """A refused FTP login answers 530; the audit log has AD's reason, never the password."""
    already = site.count(username, "ftp-ad")
    with pytest.raises(ftplib.error_perm) as caught:
        site.ftp(username, password)
    assert str(caught.value).startswith("530")
    event = site.login_event(username, "ftp-ad", already)
    assert (event["outcome"], event["reason"]) == ("failure", reason)
    assert password not in str(event)


def test_sftp_must_change_password_is_refused_with_its_reason(site):
    """mia@ad.example.com must change her password: SFTP refuses her and the audit says password-must-change."""
    already = site.count("mia@ad.example.com", "sftp-ad")
    with pytest.raises(paramiko.AuthenticationException):
        with ssh_transport(site.sftp_port, "mia@ad.example.com", PASSWORDS["mia"]):
            pass
    event = site.login_event("mia@ad.example.com", "sftp-ad", already)
    assert (event["outcome"], event["reason"]) == ("failure", "password-must-change")


def run_test_login(site, username: str, password: str, method: str = "ad-upn") -> subprocess.CompletedProcess:
    return subprocess.run(
        [SFTPAUTH, "test-login", str(site.server.config_path), username, "--password-stdin", "--authentication", method],
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_test_login_shows_the_ad_sub_code_and_its_reason(site):
    """sftpauth test-login for mia prints the BIND answer with 'data 773' and the result password-must-change."""
    result = run_test_login(site, "mia@ad.example.com", PASSWORDS["mia"])
    assert result.returncode == 1, result.stdout + result.stderr
    assert "data 773" in result.stdout
    assert "result: REJECTED (password-must-change): Active Directory: the password must be changed" in result.stdout
    assert PASSWORDS["mia"] not in result.stdout


def test_test_login_explains_an_accepted_nested_member(site):
    """sftpauth test-login for AD\\bob shows the in-chain group search, the matching rule and his home folder."""
    result = run_test_login(site, "AD\\bob", PASSWORDS["bob"], method="ad-sam")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "result: ACCEPTED by ad-sam as 'bob'" in result.stdout
    assert f"(member:1.2.840.113556.1.4.1941:={BOB_DN})" in result.stdout
    assert f"home folder: {site.srv / 'homes' / 'bob'}" in result.stdout
    assert "groups:      writers (primary: writers)" in result.stdout


def test_verify_ldap_accepts_a_dc_that_refuses_anonymous_searches(samba_dc, tmp_path):
    """verify-ldap passes on AD: without a service account the refused anonymous search is only information; with one, and over LDAPS, every check is ok."""
    common = f"type = ldap\nbind_dn_type = direct-username\nbind_dn = {FTP_USERS}\nusername_attribute = userPrincipalName\n"
    config = tmp_path / "sftpauth.ini"
    config.write_text(
        f"""\
[server]
authentications = ad-user, ad-service

[authentications/ad-user]
{common}address = {samba_dc.host}

[authentications/ad-service]
{common}address = {samba_dc.host}:{samba_dc.ldaps_port}
secure_connection = yes
tls_trusted_certificates = {samba_dc.ca_certificate}
service_account_dn = {samba_dc.admin_dn}
service_account_password = {samba_dc.admin_password}
""",
        encoding="utf-8",
    )
    result = subprocess.run([SFTPAUTH, "verify-ldap", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the directory refuses anonymous searches" in result.stdout
    assert f"under {FTP_USERS}: entries with userPrincipalName" in result.stdout
    assert f"trusted, name {samba_dc.host} matches" in result.stdout
    assert "result: every check passed on 2 server(s) of 2 LDAP method(s)" in result.stdout
