"""TOTP appended to the password, end to end: a real slapd, a real ``twistd -n sftpauth``, ftplib and paramiko.

The directory runs the ACL that docs/configuration.rst recommends: each
user's ``totpSharedSecret`` is hidden from the user and readable by
sftpauth's service account only. The server has three LDAP methods on it:

* ``directory`` (bind_dn_type = parent, with the service account) behind the
  FTP and SFTP services: the deployment the documentation describes;
* ``search-directory`` (bind_dn_type = search) behind a second FTP service;
* ``no-service-account`` behind a third FTP service: it cannot see the
  hidden secrets, which shows the ACL does hide them from their owners.

Codes are computed with pyotp from the wall clock, as an authenticator app
would; each test uses its own users so the replay store of one test does
not decide another.
"""

from __future__ import annotations

import concurrent.futures
import ftplib
import threading
import time
from pathlib import Path

import paramiko
import pyotp
import pytest

from .server import SftpauthServer, free_port, serving
from .slapd import SlapdNotFound, SlapdServer

BASE = "dc=example,dc=com"
USERS = f"ou=totp,{BASE}"
SERVICE_DN = f"cn=sftpauth,ou=services,{BASE}"
SERVICE_PASSWORD = "sftpauth-service-pass"
TIMEOUT = 10

# uid -> the otpauth URI in totpSharedSecret (None: no attribute); each password is "<uid>-pass".
SECRETS = {
    "tina": "NBSWY3DPEB3W64TMMQQHIZLTORUW4ZZR",
    "tom": "MFRGGZDFMZTWQ2LKNNWG23TPOBYXE43U",
    "ray": "ONSWG4TFORZWK3DGMFZXGZLUN5WWK3TU",
    "rex": "OJSXQ5DIMVZGKYLMNRUW4ZLSMFRWKZDE",
    "sara": "ON2XEZLMPFWWK3TUMFWGY2LOMVZGK43T",
    "olga": "N5WGOYLTMVRXEZLUOJ2W4ZLSMFWGY2LO",
    "rita": "OJUXIYLSNFSGKZDJOJSWG5DPOJ4XS2LM",
    "lou": "NRXXKZDJMFWW65LOORZWK4TWNFRWK4ZB",
}
EIGHT_DIGITS = "MVUWO2DUMRUWO2LUONZWK3DFONZWK4TF"
# ezra's URI asks for SHA256, 8 digits and 60 s steps.
EZRA = "MV5HEYLTNBQTEYLMM5XXE2LUNBWTK2RW"
EZRA_URI_OPTIONS = "&algorithm=SHA256&digits=8&period=60"
INVALID_URI = "otpauth://totp/Srv:ivan?secret=NOT-BASE32!!&issuer=Srv"
# Reasons the clients must never be able to tell apart.
FTP_FAILURE = "530 Login failed."

# What docs/configuration.rst tells administrators to add (slapd.conf form).
TOTP_ACL = f"""access to attrs=totpSharedSecret
    by dn.exact="{SERVICE_DN}" read
    by * none"""


def uri_of(uid: str, secret: str, extra: str = "") -> str:
    return f"otpauth://totp/Srv:{uid}?secret={secret}&issuer=Srv{extra}"


def code(uid: str, offset_steps: int = 0) -> str:
    """The code an authenticator app shows for ``uid`` now (or some steps away)."""
    return pyotp.TOTP(SECRETS[uid]).at(time.time() + 30 * offset_steps)


def wrong_code(uid: str) -> str:
    """A six-digit code that matches none of the steps the server could accept."""
    near = {code(uid, offset) for offset in range(-3, 4)}
    return next(f"{n:06d}" for n in range(1_000_000) if f"{n:06d}" not in near)


def entry(uid: str, attribute_value: str | None) -> str:
    lines = [
        f"dn: uid={uid},{USERS}",
        "objectClass: top",
        "objectClass: inetOrgPerson",
        "objectClass: sftpauthTestUser",
        f"uid: {uid}",
        f"cn: {uid.title()}",
        f"sn: {uid.title()}",
        f"userPassword: {uid}-pass",
    ]
    if attribute_value is not None:
        lines.append(f"totpSharedSecret: {attribute_value}")
    return "\n".join(lines) + "\n"


def directory_ldif() -> str:
    parts = [
        f"dn: ou=services,{BASE}\nobjectClass: organizationalUnit\nou: services\n",
        f"dn: {SERVICE_DN}\nobjectClass: person\ncn: sftpauth\nsn: service\nuserPassword: {SERVICE_PASSWORD}\n",
        f"dn: {USERS}\nobjectClass: organizationalUnit\nou: totp\n",
    ]
    parts += [entry(uid, uri_of(uid, secret)) for uid, secret in SECRETS.items()]
    parts.append(entry("nora", None))
    parts.append(entry("ivan", INVALID_URI))
    parts.append(entry("eve", uri_of("eve", EIGHT_DIGITS, "&digits=8")))
    parts.append(entry("ezra", uri_of("ezra", EZRA, EZRA_URI_OPTIONS)))
    return "\n".join(parts)


@pytest.fixture(scope="module")
def slapd_totp():
    """A private slapd: the base entry, a service account, the TOTP users and the hiding ACL."""
    server = SlapdServer(acl=TOTP_ACL)  # the fixture's slapd plus the recommended ACL
    try:
        server.start()
    except SlapdNotFound as error:
        if __import__("os").environ.get("SFTPAUTH_REQUIRE_INTEGRATION") == "1":
            pytest.fail(f"SFTPAUTH_REQUIRE_INTEGRATION=1 but slapd cannot be used: {error}", pytrace=False)
        pytest.skip(f"real OpenLDAP slapd not available: {error}")
    try:
        server.add_ldif(f"dn: {BASE}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n")
        server.add_ldif(directory_ldif())
        yield server
    finally:
        server.stop()


def method_section(method_id: str, slapd, options: str) -> str:
    return f"""
[authentications/{method_id}]
type = ldap
address = 127.0.0.1
port = {slapd.port}
bind_dn = {USERS}
username_attribute = uid
extension_entry_point = python:sftpauth.ldap.totp.AugmentedTOTP
extension_configuration = {{"mfa_attribute": "totpSharedSecret"}}
{options}
"""


class Site:
    def __init__(self, folder: Path, slapd):
        self.folder = folder
        self.ftp_port, self.search_port, self.plain_port, self.sftp_port = (free_port() for _ in range(4))
        service_account = f"service_account_dn = {SERVICE_DN}\nservice_account_password = {SERVICE_PASSWORD}\n"
        config = f"""
[server]
authentications = directory
audit_log = {folder / "audit.jsonl"}

[security-policies/DEFAULT-SECURITY-POLICY]
source_ip_ban_after_count = 1000

[services/ftp]
type = ftp
address = 127.0.0.1
port = {self.ftp_port}

[services/ftp-search]
type = ftp
address = 127.0.0.1
port = {self.search_port}
authentications = search-directory

[services/ftp-no-service-account]
type = ftp
address = 127.0.0.1
port = {self.plain_port}
authentications = no-service-account

[services/sftp]
type = ssh
address = 127.0.0.1
port = {self.sftp_port}

[groups/DEFAULT_GROUP]
home_folder_path = {folder / "homes"}
create_home_folder = yes
""" + method_section("directory", slapd, service_account) + method_section(
            "search-directory", slapd, service_account + "bind_dn_type = search\n"
        ) + method_section("no-service-account", slapd, "")
        self.server = SftpauthServer(
            folder, config, ports=(self.ftp_port, self.search_port, self.plain_port, self.sftp_port)
        )

    def ftp(self, username: str, password: str, port: int = 0) -> ftplib.FTP:
        client = ftplib.FTP(timeout=TIMEOUT, encoding="utf-8")
        client.connect("127.0.0.1", port or self.ftp_port)
        try:
            client.login(username, password)
        except BaseException:
            client.close()
            raise
        return client

    def ftp_refusal(self, username: str, password: str, port: int = 0) -> str:
        with pytest.raises(ftplib.error_perm) as failure:
            self.ftp(username, password, port).quit()
        return str(failure.value)

    def sftp_listing(self, username: str, password: str) -> list[str]:
        transport = paramiko.Transport(("127.0.0.1", self.sftp_port))
        try:
            transport.connect(username=username, password=password)
            client = paramiko.SFTPClient.from_transport(transport)
            try:
                return client.listdir(".")
            finally:
                client.close()
        finally:
            transport.close()

    def audit(self, username: str, reason: str) -> dict:
        return self.server.wait_for_audit(
            lambda event: event.get("event") == "authentication"
            and event.get("username") == username
            and event.get("reason") == reason,
            timeout=10,
        )


@pytest.fixture(scope="module")
def site(tmp_path_factory, slapd_totp):
    """A real sftpauth process (FTP x3, SFTP) in front of the TOTP directory."""
    site = Site(tmp_path_factory.mktemp("totp"), slapd_totp)
    with serving(site.server):
        yield site


# -- the directory itself -------------------------------------------------------------------


def test_acl_hides_the_secret_from_its_owner_but_not_from_the_service_account(slapd_totp):
    """The documented ACL works: tina cannot read her totpSharedSecret, the service account can."""
    dn = f"uid=tina,{USERS}"
    [(_, own)] = slapd_totp.search(dn, scope="base", attrs=["totpSharedSecret"], bind_dn=dn, password="tina-pass")
    assert "totpSharedSecret" not in own
    [(_, service)] = slapd_totp.search(
        dn, scope="base", attrs=["totpSharedSecret"], bind_dn=SERVICE_DN, password=SERVICE_PASSWORD
    )
    assert service["totpSharedSecret"] == [uri_of("tina", SECRETS["tina"])]


# -- logins that work ---------------------------------------------------------------------------


def test_ftp_login_with_password_and_code(site):
    """FTP: password + current code logs in, and the audit log records a success."""
    client = site.ftp("tina", "tina-pass" + code("tina"))
    assert client.pwd() == "/"
    client.quit()
    event = site.audit("tina", "")
    assert event["outcome"] == "success" and event["method"] == "directory" and event["protocol"] == "ftp"


def test_sftp_login_with_password_and_code(site):
    """SFTP: password + current code logs in and the session works."""
    assert site.sftp_listing("tom", "tom-pass" + code("tom")) == []
    assert site.audit("tom", "")["protocol"] == "sftp"


def test_next_steps_code_is_accepted(site):
    """A phone one step ahead is fine: the next step's code logs in."""
    site.ftp("olga", "olga-pass" + code("olga", +1)).quit()
    site.audit("olga", "")


def test_search_type_reads_the_secret_as_the_service_account(site):
    """bind_dn_type = search finds the entry and its hidden secret with the service account."""
    client = site.ftp("sara", "sara-pass" + code("sara"), port=site.search_port)
    client.quit()
    assert site.audit("sara", "")["method"] == "search-directory"


def test_eight_digit_uri_over_sftp_with_bind_dn_type_parent(site):
    """SPEC: the URI says how many digits. parent reads it as the service account before the BIND."""
    assert site.sftp_listing("eve", "eve-pass" + pyotp.TOTP(EIGHT_DIGITS, digits=8).now()) == []
    assert site.audit("eve", "")["method"] == "directory"


def test_sha256_eight_digit_sixty_second_uri_with_bind_dn_type_search(site):
    """search finds the URI with the entry; its algorithm, digits and period are honoured."""
    ezra = pyotp.parse_uri(uri_of("ezra", EZRA, EZRA_URI_OPTIONS))
    assert (ezra.digits, ezra.interval) == (8, 60)
    site.ftp("ezra", "ezra-pass" + ezra.now(), port=site.search_port).quit()
    assert site.audit("ezra", "")["method"] == "search-directory"


# -- replay ---------------------------------------------------------------------------------------


def test_code_used_on_ftp_is_refused_on_sftp_and_ftp(site):
    """A code that let ray in over FTP is refused over SFTP and FTP; the next code works."""
    used = code("ray")
    site.ftp("ray", "ray-pass" + used).quit()
    with pytest.raises(paramiko.AuthenticationException):
        site.sftp_listing("ray", "ray-pass" + used)
    event = site.audit("ray", "totp-replayed")
    assert event["protocol"] == "sftp"
    assert site.ftp_refusal("ray", "ray-pass" + used) == FTP_FAILURE
    assert site.sftp_listing("ray", "ray-pass" + code("ray", +1)) == []


def test_two_concurrent_logins_with_one_code_only_one_wins(site):
    """Eight FTP clients racing with rex's one code: exactly one logs in, the others are replays."""
    password = "rex-pass" + code("rex")
    start = threading.Barrier(8)
    results: list[str] = []
    lock = threading.Lock()

    def attempt() -> None:
        client = ftplib.FTP(timeout=TIMEOUT)
        client.connect("127.0.0.1", site.ftp_port)
        start.wait()
        try:
            client.login("rex", password)
            outcome = "in"
            client.quit()
        except ftplib.error_perm as error:
            outcome = str(error)
            client.close()
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(results) == [FTP_FAILURE] * 7 + ["in"]
    deadline = time.monotonic() + 10
    while True:
        events = [e for e in site.server.audit_events() if e.get("event") == "authentication" and e.get("username") == "rex"]
        if len(events) == 8 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert sorted(event["reason"] for event in events) == [""] + ["totp-replayed"] * 7


def test_code_used_through_one_method_is_refused_by_another_on_the_same_directory(site):
    """Two services, two [authentications/..] sections, one directory: a code lets rita in once."""
    used = code("rita")
    site.ftp("rita", "rita-pass" + used).quit()  # method directory (parent)
    assert site.ftp_refusal("rita", "rita-pass" + used, port=site.search_port) == FTP_FAILURE
    assert site.audit("rita", "totp-replayed")["method"] == "search-directory"


# -- wrong codes lock the account ---------------------------------------------------------------


def test_ten_wrong_codes_with_the_right_password_lock_the_account(site):
    """Ten wrong codes in a row for lou (sent at once): his next logins are refused, even with a right code."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
        replies = list(pool.map(lambda _: site.ftp_refusal("lou", "lou-pass" + wrong_code("lou")), range(10)))
    assert replies == [FTP_FAILURE] * 10
    site.server.wait_for_audit(  # the tenth wrong code says it locked the account
        lambda event: event.get("username") == "lou"
        and event.get("reason") == "totp-wrong-code"
        and "10 in a row: this account's logins are refused for 900 seconds" in event.get("detail", ""),
        timeout=10,
    )
    assert site.ftp_refusal("lou", "lou-pass" + code("lou")) == FTP_FAILURE
    assert site.audit("lou", "totp-locked")["protocol"] == "ftp"
    with pytest.raises(paramiko.AuthenticationException):
        site.sftp_listing("lou", "lou-pass" + code("lou", +1))
    locked = [e for e in site.server.audit_events() if e.get("username") == "lou" and e.get("reason") == "totp-locked"]
    assert {event["protocol"] for event in locked} == {"ftp", "sftp"}


# -- refusals, one per reason, all alike for the client ----------------------------------------


def refusals(site) -> list[tuple[str, str, str, int]]:
    """(username, password, expected audit reason, port)."""
    return [
        ("tina", "tina-pass" + wrong_code("tina"), "totp-wrong-code", site.ftp_port),
        ("tina", "not-tina-pass" + code("tina", -1), "invalid-password", site.ftp_port),
        ("tina", "tina-pass", "totp-wrong-code", site.ftp_port),  # the code was forgotten
        ("nora", "nora-pass" + code("tina"), "totp-missing-secret", site.ftp_port),
        ("ivan", "ivan-pass" + code("tina"), "totp-invalid-secret", site.ftp_port),
        # Only six of the eight digits the URI asks for: refused before eve's BIND.
        ("eve", "eve-pass" + pyotp.TOTP(EIGHT_DIGITS, digits=8).now()[-6:], "totp-wrong-code", site.ftp_port),
        ("olga", "olga-pass" + code("olga"), "totp-missing-secret", site.plain_port),
    ]


def test_each_reason_is_audited_and_the_client_only_sees_login_failed(site):
    """Wrong code, wrong password, forgotten code, missing or invalid secret: one 530 reply, distinct audit reasons."""
    replies = set()
    for username, password, reason, port in refusals(site):
        before = len(site.server.audit_events())
        replies.add(site.ftp_refusal(username, password, port))
        deadline = time.monotonic() + 10
        while len(site.server.audit_events()) <= before and time.monotonic() < deadline:
            time.sleep(0.05)
        latest = site.server.audit_events()[before]
        assert (latest["username"], latest["outcome"], latest["reason"]) == (username, "failure", reason), latest
    assert replies == {FTP_FAILURE}


def test_wrong_code_over_sftp_is_refused(site):
    """SFTP with the right password and a wrong code is refused and audited as totp-wrong-code."""
    with pytest.raises(paramiko.AuthenticationException):
        site.sftp_listing("tom", "tom-pass" + wrong_code("tom"))
    assert site.audit("tom", "totp-wrong-code")["protocol"] == "sftp"


def test_no_password_code_or_secret_in_logs(site):
    """Neither the twistd log nor the audit log holds a password, a code, a URI or a secret."""
    log = site.server.log_text()
    audit = (site.folder / "audit.jsonl").read_text(errors="replace")
    for text in (log, audit):
        assert "otpauth://" not in text
        for uid, secret in list(SECRETS.items()) + [("eve", EIGHT_DIGITS)]:
            assert secret not in text
            assert f"{uid}-pass" not in text
