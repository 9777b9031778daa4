"""Group mapping, roles, group search and nested groups against real OpenLDAP slapd servers.

Two private slapd servers: one with the memberOf overlay
(data/groups-memberof.ldif, the SFTPPlus group_mapping example) and one
without it (data/groups-posix.ldif: posixGroup memberUid, and a nested
groupOfNames chain with a cycle). The LDAP method runs in this process on
the test's reactor; ``sftpauth test-login`` and a real ``twistd -n
sftpauth`` (FTP and SFTP) run as subprocesses against the same servers.
"""

from __future__ import annotations

import ftplib
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import paramiko
import pytest
import pytest_twisted

from sftpauth.auth.credentials import LoginRequest
from sftpauth.auth.errors import LoginFailed
from sftpauth.auth.ldap.method import LDAPMethod
from sftpauth.auth.trace import Trace
from sftpauth.config.loader import parse_configuration

from .server import SftpauthServer, free_port
from .slapd import CUSTOM_SCHEMA, DATA_DIR, SlapdNotFound, SlapdServer

pytestmark = pytest.mark.slapd

REPOSITORY = Path(__file__).resolve().parents[2]
GROUPS_SCHEMA = DATA_DIR / "groups-test.schema"
BASE = "dc=example,dc=com"
PEOPLE = f"ou=people,{BASE}"
GROUPS = f"ou=groups,{BASE}"
TIMEOUT = 10

SEED_MAPPING = """
group_mapping =
    987d-54da-db3c
    memberOf, *-apac-*, 54ae-987d-09ff, 987d-88de-4213, 8fde-54da-00aa
    memberOf, *-it-*, 5b9f-2600-ebd6
    operationalUnit, m/sales-force-[1-3]/, 8fde-54da-00aa
"""


def seed_groups(homes: Path) -> str:
    """The five groups of the example: apac has full control, IT and the fallback may only read."""
    return f"""
[groups/987d-54da-db3c]
home_folder_path = {homes}/fallback
create_home_folder = yes
permissions = allow-read, allow-list

[groups/54ae-987d-09ff]
home_folder_path = {homes}/apac
create_home_folder = yes
permissions = allow-full-control

[groups/987d-88de-4213]
home_folder_path = {homes}/second
create_home_folder = yes

[groups/8fde-54da-00aa]
home_folder_path = {homes}/sales
create_home_folder = yes
permissions = allow-read, allow-list, allow-write

[groups/5b9f-2600-ebd6]
home_folder_path = {homes}/it
create_home_folder = yes
permissions = allow-read, allow-list
"""


def _start(overlays, ldif: str):
    server = SlapdServer(extra_schemas=(CUSTOM_SCHEMA, GROUPS_SCHEMA), overlays=overlays)
    try:
        server.start()
    except SlapdNotFound as error:
        if os.environ.get("SFTPAUTH_REQUIRE_INTEGRATION") == "1":
            pytest.fail(f"SFTPAUTH_REQUIRE_INTEGRATION=1 but slapd cannot be used: {error}", pytrace=False)
        pytest.skip(f"real OpenLDAP slapd not available: {error}")
    try:
        server.add_ldif_file(DATA_DIR / ldif)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def memberof_slapd():
    """A slapd with the memberOf overlay and the group mapping example's directory."""
    server = _start(("memberof",), "groups-memberof.ldif")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def posix_slapd():
    """A slapd without the memberOf overlay: posixGroups and a nested groupOfNames cycle."""
    server = _start((), "groups-posix.ldif")
    yield server
    server.stop()


def config_text(slapd, folder: Path, options: str, extra: str = "", username_attribute: str = "cn") -> str:
    return (
        textwrap.dedent(
            f"""
            [server]
            authentications = directory
            audit_log = {folder}/audit.jsonl
            data_folder = {folder}/data

            [security-policies/DEFAULT-SECURITY-POLICY]
            source_ip_ban_after_count = 1000

            [authentications/directory]
            type = ldap
            address = 127.0.0.1
            port = {slapd.port}
            timeout = 5
            bind_dn = {PEOPLE}
            username_attribute = {username_attribute}
            """
        )
        + textwrap.dedent(options)
        + textwrap.dedent(extra)
    )


def method_for(slapd, folder: Path, options: str, extra: str = "", username_attribute: str = "cn") -> LDAPMethod:
    from twisted.internet import reactor

    text = config_text(slapd, folder, options, extra, username_attribute)
    configuration = parse_configuration(text, str(folder / "sftpauth.ini"), str(folder), {})
    return LDAPMethod(configuration.authentications["directory"], configuration, reactor)


async def login(method: LDAPMethod, username: str, password: str, manager: bool = False):
    trace = Trace()
    request = LoginRequest(username, password, "test", "cli", "127.0.0.1", manager=manager, trace=trace)
    account = await method.authenticate(request)
    return account, trace


def details(trace: Trace, action: str) -> list[str]:
    return [step.detail for step in trace.steps if step.action == action]


# -- the memberOf overlay directory -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_seed_example_against_a_memberof_directory(memberof_slapd, tmp_path):
    """bob's memberOf DN matches *-apac-*: primary 54ae-987d-09ff, then 987d-88de-4213 and 8fde-54da-00aa."""
    method = method_for(memberof_slapd, tmp_path, SEED_MAPPING, seed_groups(tmp_path / "homes"))
    account, trace = await login(method, "bob", "bob-pass")
    assert account.groups == ("54ae-987d-09ff", "987d-88de-4213", "8fde-54da-00aa")
    assert account.home_folder == str(tmp_path / "homes" / "apac" / "bob")
    explanation = details(trace, "groups")
    assert explanation[0].startswith("group_mapping rule 1 'memberOf, *-apac-*, 54ae-987d-09ff")
    assert "'cn=sales-apac-oceania,ou=groups,dc=example,dc=com'" in explanation[0]
    assert explanation[-1] == "groups: 54ae-987d-09ff, 987d-88de-4213, 8fde-54da-00aa (primary: 54ae-987d-09ff)"


@pytest_twisted.ensureDeferred
async def test_other_rules_and_the_fallback_against_a_memberof_directory(memberof_slapd, tmp_path):
    """ian matches *-it-*, sam the operationalUnit regex, nora nothing (the fallback group)."""
    method = method_for(memberof_slapd, tmp_path, SEED_MAPPING, seed_groups(tmp_path / "homes"))
    ian, _ = await login(method, "ian", "ian-pass")
    sam, sam_trace = await login(method, "sam", "sam-pass")
    nora, nora_trace = await login(method, "nora", "nora-pass")
    assert ian.groups == ("5b9f-2600-ebd6",)
    assert sam.groups == ("8fde-54da-00aa",)
    rule = "rule 3 'operationalUnit, m/sales-force-[1-3]/, 8fde-54da-00aa' matched"
    assert any(rule in line for line in details(sam_trace, "groups"))
    assert nora.groups == ("987d-54da-db3c",)
    assert "group_mapping no rule matched: fallback group 987d-54da-db3c" in details(nora_trace, "groups")


@pytest_twisted.ensureDeferred
async def test_external_groups_association_against_a_memberof_directory(memberof_slapd, tmp_path):
    """nora's memberOf cn=Partners matches a DN written in another case and spacing, so she gets the partners group."""
    extra = seed_groups(tmp_path / "homes") + f"""
[groups/partners]
home_folder_path = {tmp_path}/homes/partners
external_groups_association =
    CN=partners, OU=Groups, DC=Example, DC=com
"""
    method = method_for(memberof_slapd, tmp_path, SEED_MAPPING, extra)
    nora, trace = await login(method, "nora", "nora-pass")
    bob, _ = await login(method, "bob", "bob-pass")
    assert nora.groups == ("987d-54da-db3c", "partners")
    assert any("external_groups_association of [groups/partners]" in line for line in details(trace, "groups"))
    assert "partners" not in bob.groups


@pytest_twisted.ensureDeferred
async def test_nested_groups_with_the_memberof_overlay(memberof_slapd, tmp_path):
    """memberOf gives bob's direct groups; the walk finds cn=apac, parent of cn=sales-apac-oceania."""
    options = f"""
    group_search_base = {GROUPS}
    nested_groups = yes
    group_mapping =
        memberOf, g/cn=apac,{GROUPS}/, 54ae-987d-09ff
    """
    method = method_for(memberof_slapd, tmp_path, options, seed_groups(tmp_path / "homes"))
    account, trace = await login(method, "bob", "bob-pass")
    assert account.groups == ("54ae-987d-09ff",)
    searches = details(trace, "groups")
    assert searches[0].startswith("nested groups, level 1: search (|(member=cn=sales-apac-oceania,ou=groups")
    assert "1 group(s): cn=apac,ou=groups,dc=example,dc=com" in searches[0]
    assert searches[1].startswith("nested groups, level 2: search (member=cn=apac,ou=groups,dc=example,dc=com)")


@pytest_twisted.ensureDeferred
async def test_roles_mapping_for_a_manager_login(memberof_slapd, tmp_path):
    """A Web Manager login of bob (memberOf cn=auditors) gets the auditors role; ian gets DEFAULT-ROLE."""
    options = f"""
    manager_search_filter = (objectClass=inetOrgPerson)
    roles_mapping =
        memberOf, g/cn=auditors,{GROUPS}/, auditors
    """
    extra = "\n[roles/auditors]\nname = Auditors\npermissions = configuration, read\n"
    method = method_for(memberof_slapd, tmp_path, options, extra)
    bob, trace = await login(method, "bob", "bob-pass", manager=True)
    ian, _ = await login(method, "ian", "ian-pass", manager=True)
    assert bob.roles == ("auditors",)
    assert details(trace, "roles")[-1] == "roles: auditors"
    assert ian.roles == ("DEFAULT-ROLE",)


# -- a directory without memberOf ------------------------------------------------------------------------


def test_posix_directory_has_no_member_of(posix_slapd):
    """The second server really has no memberOf overlay: alice's entry has no memberOf."""
    ((dn, attributes),) = posix_slapd.search(f"uid=alice,{PEOPLE}", scope="base", attrs=["memberOf"])
    assert "memberOf" not in attributes


POSIX_SEARCH = f"""
group_search_base = {GROUPS}
group_search_filter = (&(objectClass=posixGroup)(memberUid={{username}}))
group_mapping =
    987d-54da-db3c
    memberOf, g/cn=posix-ftp,{GROUPS}/, 54ae-987d-09ff
    memberOf, g/cn=posix-evelyn,{GROUPS}/, 5b9f-2600-ebd6
    memberOf, g/cn=posix-admins,{GROUPS}/, 8fde-54da-00aa
"""


@pytest_twisted.ensureDeferred
async def test_posix_group_search_gives_member_of_values(posix_slapd, tmp_path):
    """Without memberOf, the posixGroup found by memberUid={username} counts as a memberOf value."""
    method = method_for(posix_slapd, tmp_path, POSIX_SEARCH, seed_groups(tmp_path / "homes"), "uid")
    account, trace = await login(method, "alice", "alice-pass")
    assert account.groups == ("54ae-987d-09ff",)
    (search,) = [line for line in details(trace, "groups") if line.startswith("group search")]
    assert search == (
        f"group search: search (&(objectClass=posixGroup)(memberUid=alice)) under {GROUPS}: "
        f"1 group(s): cn=posix-ftp,{GROUPS}"
    )


@pytest_twisted.ensureDeferred
async def test_group_search_values_are_escaped(posix_slapd, tmp_path):
    """The username eve* is sent as a literal value: she gets posix-admins, never posix-evelyn."""
    method = method_for(posix_slapd, tmp_path, POSIX_SEARCH, seed_groups(tmp_path / "homes"), "uid")
    account, trace = await login(method, "eve*", "eve-pass")
    assert account.groups == ("8fde-54da-00aa",)
    (search,) = [line for line in details(trace, "groups") if line.startswith("group search")]
    assert "(memberUid=eve\\2a)" in search
    assert search.endswith(f"1 group(s): cn=posix-admins,{GROUPS}")


@pytest_twisted.ensureDeferred
async def test_nested_groupofnames_chain_with_a_cycle(posix_slapd, tmp_path):
    """carol in team-a gets dept-b and division-c too; the cycle back to team-a ends the walk, one search per level."""
    options = f"""
    group_search_base = {GROUPS}
    group_search_filter = (&(objectClass=groupOfNames)(member={{dn}}))
    nested_groups = yes
    group_mapping =
        memberOf, g/cn=division-c,{GROUPS}/, 54ae-987d-09ff
    """
    method = method_for(posix_slapd, tmp_path, options, seed_groups(tmp_path / "homes"), "uid")
    account, trace = await login(method, "carol", "carol-pass")
    assert account.groups == ("54ae-987d-09ff",)
    searches = [line for line in details(trace, "groups") if "search (" in line]
    assert len(searches) == 4
    assert searches[0].startswith("group search: search (&(objectClass=groupOfNames)(member=uid=carol,ou=people")
    assert searches[0].endswith(f"1 group(s): cn=team-a,{GROUPS}")
    assert searches[1].startswith("nested groups, level 1") and searches[1].endswith(f"cn=dept-b,{GROUPS}")
    assert searches[2].startswith("nested groups, level 2") and searches[2].endswith(f"cn=division-c,{GROUPS}")
    assert searches[3].startswith("nested groups, level 3") and searches[3].endswith(f"cn=team-a,{GROUPS}")
    assert not any("stopped after" in line for line in details(trace, "groups"))


@pytest_twisted.ensureDeferred
async def test_posix_group_nested_in_a_groupofnames(posix_slapd, tmp_path):
    """With a memberUid filter, nesting walks (member={dn}) from the posixGroup to cn=all-staff."""
    options = f"""
    group_search_base = {GROUPS}
    group_search_filter = (memberUid={{username}})
    nested_groups = yes
    group_mapping =
        memberOf, g/cn=all-staff,{GROUPS}/, 5b9f-2600-ebd6
    """
    method = method_for(posix_slapd, tmp_path, options, seed_groups(tmp_path / "homes"), "uid")
    account, trace = await login(method, "alice", "alice-pass")
    assert account.groups == ("5b9f-2600-ebd6",)
    assert any(
        line.startswith(f"nested groups, level 1: search (member=cn=posix-ftp,{GROUPS})") for line in details(trace, "groups")
    )


@pytest_twisted.ensureDeferred
async def test_missing_group_search_base_rejects_the_login(posix_slapd, tmp_path):
    """A group search under a base that does not exist refuses the login (group-search-failed)."""
    options = f"""
    group_search_base = ou=missing,{BASE}
    group_search_filter = (memberUid={{username}})
    group_mapping = memberOf, *, 54ae-987d-09ff
    """
    method = method_for(posix_slapd, tmp_path, options, seed_groups(tmp_path / "homes"), "uid")
    with pytest.raises(LoginFailed) as caught:
        await login(method, "alice", "alice-pass")
    assert caught.value.reason == "group-search-failed"


# -- sftpauth test-login ------------------------------------------------------------------------------


def run_test_login(config_path: Path, username: str, password: str, *options: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).with_name("sftpauth")), "test-login", str(config_path), username, "--password-stdin"]
    return subprocess.run(
        command + list(options), input=password + "\n", capture_output=True, text=True, timeout=60, cwd=config_path.parent
    )


def test_cli_test_login_explains_the_matching_rule(memberof_slapd, tmp_path):
    """sftpauth test-login prints which rule matched on which value, and the final groups and permissions."""
    config = tmp_path / "sftpauth.ini"
    config.write_text(config_text(memberof_slapd, tmp_path, SEED_MAPPING, seed_groups(tmp_path / "homes")))
    result = run_test_login(config, "bob", "bob-pass")
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout
    assert "rule 1 'memberOf, *-apac-*, 54ae-987d-09ff, 987d-88de-4213, 8fde-54da-00aa' matched: memberOf value" in output
    assert "'cn=sales-apac-oceania,ou=groups,dc=example,dc=com' matches *-apac-*" in output
    assert "groups:      54ae-987d-09ff, 987d-88de-4213, 8fde-54da-00aa (primary: 54ae-987d-09ff)" in output
    assert "bob-pass" not in output


def test_cli_test_login_shows_roles_for_a_manager(memberof_slapd, tmp_path):
    """sftpauth test-login --manager prints the roles_mapping decision and the roles."""
    options = f"""
    manager_search_filter = (objectClass=inetOrgPerson)
    roles_mapping =
        memberOf, g/cn=auditors,{GROUPS}/, auditors
    """
    config = tmp_path / "sftpauth.ini"
    config.write_text(config_text(memberof_slapd, tmp_path, options, "\n[roles/auditors]\npermissions = configuration, read\n"))
    result = run_test_login(config, "bob", "bob-pass", "--manager")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "roles_mapping rule 1 'memberOf, g/cn=auditors,ou=groups,dc=example,dc=com/, auditors' matched" in result.stdout
    assert "roles:       auditors" in result.stdout


# -- real FTP and SFTP logins: permissions differ by mapped group -------------------------------------------


class Site:
    def __init__(self, folder: Path, server: SftpauthServer, ftp_port: int, sftp_port: int):
        self.folder = folder
        self.homes = folder / "homes"
        self.server = server
        self.ftp_port = ftp_port
        self.sftp_port = sftp_port


@pytest.fixture(scope="module")
def site(memberof_slapd, tmp_path_factory):
    """A real twistd -n sftpauth with FTP and SFTP whose LDAP method maps bob (full control) and ian (read-only)."""
    folder = tmp_path_factory.mktemp("groups-site")
    ftp_port, sftp_port = free_port(), free_port()
    while sftp_port == ftp_port:
        sftp_port = free_port()
    services = f"""
[services/ftp]
type = ftp
address = 127.0.0.1
port = {ftp_port}

[services/sftp]
type = ssh
address = 127.0.0.1
port = {sftp_port}
"""
    text = config_text(memberof_slapd, folder, SEED_MAPPING, seed_groups(folder / "homes") + services)
    server = SftpauthServer(folder, text, ports=(ftp_port, sftp_port))
    with pytest.MonkeyPatch.context() as patch:
        # twistd finds twisted/plugins/sftpauth_plugin.py of this checkout only with it on the path.
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")])))
        server.start()
    try:
        yield Site(folder, server, ftp_port, sftp_port)
    finally:
        status = server.stop()
    assert "Traceback" not in server.log_text(), server.log_tail(200)
    assert status == 0, server.log_tail()


def ftp_client(site: Site, username: str) -> ftplib.FTP:
    client = ftplib.FTP(timeout=TIMEOUT)
    client.connect("127.0.0.1", site.ftp_port)
    client.login(username, f"{username}-pass")
    return client


def test_ftp_permissions_follow_the_mapped_primary_group(site):
    """Over FTP, bob (54ae-987d-09ff, full control) may upload; ian (5b9f-2600-ebd6, read-only) may list but not upload."""
    bob = ftp_client(site, "bob")
    assert bob.storbinary("STOR from-bob.txt", io.BytesIO(b"bob was here")).startswith("226")
    bob.quit()
    assert (site.homes / "apac" / "bob" / "from-bob.txt").read_bytes() == b"bob was here"

    (site.homes / "it" / "ian").mkdir(parents=True, exist_ok=True)
    (site.homes / "it" / "ian" / "readme.txt").write_bytes(b"for ian")
    ian = ftp_client(site, "ian")
    assert ian.nlst() == ["readme.txt"]
    with pytest.raises(ftplib.error_perm) as refused:
        ian.storbinary("STOR from-ian.txt", io.BytesIO(b"ian was here"))
    assert str(refused.value).startswith("550")
    out = io.BytesIO()
    ian.retrbinary("RETR readme.txt", out.write)
    assert out.getvalue() == b"for ian"
    ian.quit()
    assert not (site.homes / "it" / "ian" / "from-ian.txt").exists()


def sftp_client(site: Site, username: str) -> tuple[paramiko.Transport, paramiko.SFTPClient]:
    transport = paramiko.Transport(("127.0.0.1", site.sftp_port))
    transport.connect(username=username, password=f"{username}-pass")
    return transport, paramiko.SFTPClient.from_transport(transport)


def test_sftp_permissions_follow_the_mapped_primary_group(site):
    """Over SFTP, bob may create files and folders; ian may read his home but every write is refused."""
    transport, bob = sftp_client(site, "bob")
    try:
        with bob.open("sftp-from-bob.txt", "wb") as remote:
            remote.write(b"bob over sftp")
        bob.mkdir("bob-folder")
    finally:
        bob.close()
        transport.close()
    assert (site.homes / "apac" / "bob" / "sftp-from-bob.txt").read_bytes() == b"bob over sftp"
    assert (site.homes / "apac" / "bob" / "bob-folder").is_dir()

    (site.homes / "it" / "ian").mkdir(parents=True, exist_ok=True)
    (site.homes / "it" / "ian" / "sftp-readme.txt").write_bytes(b"read me")
    transport, ian = sftp_client(site, "ian")
    try:
        with ian.open("sftp-readme.txt", "rb") as remote:
            assert remote.read() == b"read me"
        with pytest.raises(PermissionError):
            with ian.open("sftp-from-ian.txt", "wb") as remote:
                remote.write(b"ian over sftp")
        with pytest.raises(PermissionError):
            ian.mkdir("ian-folder")
    finally:
        ian.close()
        transport.close()
    assert not (site.homes / "it" / "ian" / "sftp-from-ian.txt").exists()
    assert not (site.homes / "it" / "ian" / "ian-folder").exists()
