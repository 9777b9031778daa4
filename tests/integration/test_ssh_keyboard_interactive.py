"""SSH keyboard-interactive logins of a real ``twistd -n sftpauth``, with paramiko and OpenSSH ``sftp``.

The server's chain is ``DEFAULT-AUTHENTICATION`` (local account alice, no
TOTP) then ``DIRECTORY``: an LDAP method with the TOTP extension, pointed at
the embedded ``ldap-directory`` service of the same process (ldaptor,
loaded from an LDIF written here). Every directory user has a TOTP secret;
each test logs in as its own user, so one test's used code (refused as a
replay for the rest of its validity) never decides another.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Optional

import paramiko
import pyotp
import pytest

from sftpauth.auth.passwords import hash_password

from .server import SftpauthServer, free_port
from .sftp_fixtures import integration_required, plugin_on_python_path, require_tools

BASE = "ou=people,dc=example,dc=com"
SECRETS = {
    "tina": "NBSWY3DPEB3W64TMMQQHIZLTORUW4ZZR",
    "tom": "MFRGGZDFMZTWQ2LKNNWG23TPOBYXE43U",
    "ray": "ONSWG4TFORZWK3DGMFZXGZLUN5WWK3TU",
    "rex": "OJSXQ5DIMVZGKYLMNRUW4ZLSMFRWKZDE",
    "sara": "ON2XEZLMPFWWK3TUMFWGY2LOMVZGK43T",
}
LOCAL_PASSWORD = "alice-local-pass"
TIMEOUT = 10


def code(uid: str, offset_steps: int = 0) -> str:
    return pyotp.TOTP(SECRETS[uid]).at(time.time() + 30 * offset_steps)


def wrong_code(uid: str) -> str:
    near = {code(uid, offset) for offset in range(-3, 4)}
    return next(f"{n:06d}" for n in range(1_000_000) if f"{n:06d}" not in near)


def directory_ldif() -> str:
    parts = [
        "dn: dc=example,dc=com\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n",
        f"dn: {BASE}\nobjectClass: organizationalUnit\nou: people\n",
    ]
    for uid, secret in SECRETS.items():
        parts.append(
            f"dn: uid={uid},{BASE}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid}\nsn: {uid}\n"
            f"userPassword: {uid}-pass\ntotpSharedSecret: otpauth://totp/Srv:{uid}?secret={secret}&issuer=Srv\n"
        )
    return "\n".join(parts)


class Site:
    def __init__(self, folder: Path):
        self.folder = folder
        self.ldap_port, self.port, self.custom_port = free_port(), free_port(), free_port()
        (folder / "directory.ldif").write_text(directory_ldif(), encoding="utf-8")
        self.server = SftpauthServer(folder, self.config(), ports=(self.ldap_port, self.port, self.custom_port))

    def config(self) -> str:
        return f"""
[server]
authentications = DEFAULT-AUTHENTICATION, DIRECTORY
audit_log = {self.folder / "audit.jsonl"}

[services/directory]
type = ldap-directory
port = {self.ldap_port}
ldif = {self.folder / "directory.ldif"}

[services/sftp]
type = ssh
port = {self.port}

[services/custom]
type = ssh
port = {self.custom_port}
keyboard_interactive_message = "Directory password:"

[authentications/DIRECTORY]
type = ldap
address = 127.0.0.1:{self.ldap_port}
bind_dn = {BASE}
username_attribute = uid
extension_entry_point = python:sftpauth.ldap.totp.AugmentedTOTP
extension_configuration = {{"mfa_attribute": "totpSharedSecret"}}

[groups/DEFAULT_GROUP]
home_folder_path = {self.folder / "homes"}
create_home_folder = yes

[accounts/alice]
password = {hash_password(LOCAL_PASSWORD)}
"""

    def audit(self, username: str) -> list[dict]:
        return [
            event
            for event in self.server.audit_events()
            if event.get("event") == "authentication" and event.get("username") == username
        ]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The running server: embedded directory, two SSH services."""
    site = Site(tmp_path_factory.mktemp("ssh-kbd"))
    with plugin_on_python_path():
        site.server.start()
    try:
        yield site
    finally:
        status = site.server.stop()
    log = site.server.log_text()
    assert "Traceback" not in log, site.server.log_tail(200)
    assert status == 0


def interactive_login(port: int, username: str, answers: dict[str, str]) -> tuple[Optional[paramiko.Transport], list]:
    """A keyboard-interactive login answering each prompt from ``answers`` (by prompt text).

    Returns the authenticated transport (None when refused) and the prompts seen, one list per round.
    """
    transport = paramiko.Transport(("127.0.0.1", port))
    transport.start_client(timeout=TIMEOUT)
    rounds: list = []

    def handler(title, instructions, prompts):
        rounds.append([(text, echo) for text, echo in prompts])
        return [answers[text] for text, echo in prompts]

    try:
        transport.auth_interactive(username, handler)
    except paramiko.AuthenticationException:
        transport.close()
        return None, rounds
    return transport, rounds


# -- what the server offers --------------------------------------------------------------


def test_password_and_keyboard_interactive_are_offered(site):
    """The methods offered are those of the portal's checker: password and keyboard-interactive."""
    transport = paramiko.Transport(("127.0.0.1", site.port))
    transport.start_client(timeout=TIMEOUT)
    with pytest.raises(paramiko.BadAuthenticationType) as offered:
        transport.auth_none("tina")
    transport.close()
    assert offered.value.allowed_types == ["password", "keyboard-interactive"]


# -- paramiko ---------------------------------------------------------------------------


def test_paramiko_answers_the_password_then_the_verification_code(site):
    """A TOTP account gets "Password:" then "Verification code:" (both hidden) and then an SFTP session."""
    transport, rounds = interactive_login(
        site.port, "tina", {"Password:": "tina-pass", "Verification code:": code("tina")}
    )
    assert rounds == [[("Password:", False)], [("Verification code:", False)]]
    assert transport is not None and transport.is_authenticated()
    sftp = paramiko.SFTPClient.from_transport(transport)
    sftp.get_channel().settimeout(TIMEOUT)
    with sftp.open("hello.txt", "w") as remote:
        remote.write(b"two factors")
    assert sftp.listdir(".") == ["hello.txt"]
    sftp.close()
    transport.close()
    assert (site.folder / "homes" / "tina" / "hello.txt").read_bytes() == b"two factors"
    assert site.audit("tina")[-1]["outcome"] == "success"


def test_a_wrong_password_still_gets_the_code_prompt(site):
    """Whether the password is right is not revealed before the code is typed: both prompts come, then failure."""
    transport, rounds = interactive_login(
        site.port, "rex", {"Password:": "not-rex-pass", "Verification code:": code("rex")}
    )
    assert transport is None
    assert [len(prompts) for prompts in rounds[:2]] == [1, 1]
    assert rounds[1] == [("Verification code:", False)]
    assert site.audit("rex")[-1]["outcome"] == "failure"
    assert not site.audit("rex")[-1]["reason"].startswith("totp-")  # the LDAP BIND failed first


def test_a_wrong_code_fails_like_a_wrong_password(site):
    """A right password with a wrong code is refused; the audit log, not the client, says the code was wrong."""
    transport, rounds = interactive_login(
        site.port, "sara", {"Password:": "sara-pass", "Verification code:": wrong_code("sara")}
    )
    assert transport is None
    assert rounds[1] == [("Verification code:", False)]
    assert site.audit("sara")[-1]["reason"] == "totp-wrong-code"


def test_a_local_account_gets_only_the_password_prompt(site):
    """An account of the local method (no TOTP) gets one prompt and logs in with its password."""
    transport, rounds = interactive_login(site.port, "alice", {"Password:": LOCAL_PASSWORD})
    assert rounds == [[("Password:", False)]]
    assert transport is not None and transport.is_authenticated()
    transport.close()


def test_keyboard_interactive_message_is_the_first_prompt(site):
    """keyboard_interactive_message of the service is the text of the password prompt."""
    transport, rounds = interactive_login(site.custom_port, "alice", {"Directory password:": LOCAL_PASSWORD})
    assert rounds == [[("Directory password:", False)]]
    assert transport is not None and transport.is_authenticated()
    transport.close()


def test_password_authentication_with_password_and_code_still_works(site):
    """The password method with password and code as one string logs a TOTP account in, as before."""
    transport = paramiko.Transport(("127.0.0.1", site.port))
    try:
        transport.connect(username="ray", password="ray-pass" + code("ray"))
        assert transport.is_authenticated()
    finally:
        transport.close()


# -- OpenSSH sftp on a pty ----------------------------------------------------------------


def test_openssh_sftp_types_password_and_code_at_two_prompts(site, tmp_path):
    """OpenSSH sftp with PreferredAuthentications=keyboard-interactive, driven on a pty, answers both prompts and transfers a file."""
    require_tools("sftp")
    try:
        import pexpect
    except ImportError:
        if integration_required():
            pytest.fail("SFTPAUTH_REQUIRE_INTEGRATION=1 but pexpect is not installed (pip install .[test])", pytrace=False)
        pytest.skip("pexpect is not installed")
    (tmp_path / "up.txt").write_bytes(b"typed at a terminal\n")
    child = pexpect.spawn(
        "sftp",
        [
            "-oStrictHostKeyChecking=no", "-oUserKnownHostsFile=/dev/null", "-oBatchMode=no",
            "-oPreferredAuthentications=keyboard-interactive", "-oPubkeyAuthentication=no",
            "-oNumberOfPasswordPrompts=1", "-P", str(site.port), "tom@127.0.0.1",
        ],
        cwd=str(tmp_path),
        env={**os.environ, "LC_ALL": "C"},
        timeout=20,
    )
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(child.close, force=True)
        child.expect_exact("Password:")
        child.sendline("tom-pass")
        child.expect_exact("Verification code:")
        child.sendline(code("tom"))
        child.expect_exact("sftp> ")
        child.sendline("put up.txt")
        child.expect_exact("sftp> ")
        child.sendline("ls")
        child.expect_exact("up.txt")
        child.expect_exact("sftp> ")
        child.sendline("bye")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    assert (site.folder / "homes" / "tom" / "up.txt").read_bytes() == b"typed at a terminal\n"
    assert site.audit("tom")[-1]["outcome"] == "success"
