"""The demo of README.rst's first command: etc/demo/ as shipped, and its users doing what README.rst's table says.

The demo's configuration and LDIF are copied with only their fixed ports
(10021, 10022, 10389, 10443, the passive range) and their folder
(``/tmp/sftpauth-demo``) replaced, so a test run never meets a demo a
developer has running. The embedded directory is ldaptor's in-memory
server, which is what the demo serves; slapd is proven elsewhere.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import paramiko
import pytest

from .manager_helpers import HTTPSClient
from .policy_helpers import ftp_fails, ftp_login
from .server import REPOSITORY, SftpauthServer, free_port, serving
from .sftp_fixtures import ssh_transport


DEMO = REPOSITORY / "etc" / "demo"
FIXED_PORTS = ("10021", "10022", "10389", "10443")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    config = (DEMO / "sftpauth.ini").read_text(encoding="utf-8")
    ldif = (DEMO / "directory.ldif").read_text(encoding="utf-8")
    ports = {fixed: free_port() for fixed in FIXED_PORTS}
    for fixed in FIXED_PORTS:
        assert f":{fixed}" in config or f"= {fixed}" in config, f"the demo no longer uses port {fixed}"
        config = config.replace(fixed, str(ports[fixed]))
    assert "passive_port_range = 10100-10199" in config
    config = config.replace("passive_port_range = 10100-10199", "")  # any free port
    assert "/tmp/sftpauth-demo" in config and "/tmp/sftpauth-demo/home/alice" in ldif
    config = config.replace("/tmp/sftpauth-demo", str(folder))
    (folder / "directory.ldif").write_text(ldif.replace("/tmp/sftpauth-demo", str(folder)), encoding="utf-8")
    server = SftpauthServer(folder, config, ports=tuple(ports[fixed] for fixed in ("10389", "10021", "10022", "10443")))
    with serving(server):
        yield SimpleNamespace(
            server=server, folder=folder, ftp=ports["10021"], sftp=ports["10022"],
            manager=SimpleNamespace(port=ports["10443"], certificate=folder / "data" / "manager" / "certificate.pem"),
        )


def login_event(demo, username: str, service: str) -> dict:
    return demo.server.wait_for_audit(
        lambda event: event.get("event") == "authentication" and event.get("username") == username
        and event.get("service") == service
    )


def test_alice_logs_in_over_ftp_into_her_home_folder(demo):
    client = ftp_login(demo.ftp, "alice", "alice-demo", "127.0.0.1")
    try:
        assert client.pwd() == "/"
        client.storbinary("STOR hello.txt", io.BytesIO(b"hello from the demo\n"))
        assert client.nlst() == ["hello.txt"]
    finally:
        client.quit()
    assert (demo.folder / "home" / "alice" / "hello.txt").read_bytes() == b"hello from the demo\n"
    assert login_event(demo, "alice", "demo-ftp")["outcome"] == "success"


def test_alice_logs_in_over_sftp(demo):
    with ssh_transport(demo.sftp, "alice", "alice-demo") as transport:
        sftp = paramiko.SFTPClient.from_transport(transport)
        with sftp.open("from-sftp.txt", "wb") as remote:
            remote.write(b"sftp\n")
        assert "from-sftp.txt" in sftp.listdir(".")
        sftp.close()
    assert (demo.folder / "home" / "alice" / "from-sftp.txt").read_bytes() == b"sftp\n"


def test_bob_is_found_under_the_second_base_dn(demo):
    ftp_login(demo.ftp, "bob", "bob-demo", "127.0.0.1").quit()
    event = login_event(demo, "bob", "demo-ftp")
    assert event["outcome"] == "success"
    assert (demo.folder / "home" / "bob").is_dir()


@pytest.mark.parametrize("username, password, reason", [
    ("carol", "carol-demo", "filter-mismatch"),
    ("alice", "not-her-password", "invalid-password"),
    ("admin", "admin-demo", "unknown-user"),
])
def test_refused_logins_say_only_login_failed_and_the_audit_log_says_why(demo, username, password, reason):
    assert ftp_fails(demo.ftp, username, password, "127.0.0.1") == "530 Login failed."
    event = demo.server.wait_for_audit(
        lambda event: event.get("username") == username and event.get("outcome") == "failure"
        and event.get("reason") == reason
    )
    assert event["service"] == "demo-ftp"


def test_web_manager_users(demo):
    alice = HTTPSClient(demo.manager)
    status, body = alice.login("alice", "alice-demo")
    assert status == 200, body
    assert alice.get_json("/api/v1/session")[1]["roles"] == ["DEFAULT-ROLE"]

    status, _ = HTTPSClient(demo.manager).login("bob", "bob-demo")
    assert status == 401
    demo.server.wait_for_audit(
        lambda event: event.get("username") == "bob" and event.get("service") == "demo-manager"
        and event.get("reason") == "filter-mismatch"
    )

    admin = HTTPSClient(demo.manager)
    assert admin.login("admin", "admin-demo")[0] == 200
    status, checked = admin.post_json("/api/v1/authentications/DEMO-LDAP/verify_connection", {})
    assert status == 200, checked

    auditor = HTTPSClient(demo.manager)
    assert auditor.login("auditor", "auditor-demo")[0] == 200
    assert auditor.get_json("/api/v1/services")[0] == 200
    status, _ = auditor.post_json("/api/v1/authentications/DEMO-LDAP/verify_connection", {})
    assert status == 403


def test_readme_test_login_example_explains_carols_refusal(demo):
    result = subprocess.run(
        [str(Path(sys.executable).with_name("sftpauth")), "test-login", str(demo.server.config_path), "carol",
         "--password-stdin"],
        input="carol-demo\n", capture_output=True, text=True, timeout=60, cwd=demo.folder,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "filter-mismatch" in result.stdout
    assert "carol-demo" not in result.stdout + result.stderr


def test_the_demo_log_names_what_starts_without_object_addresses(demo):
    """One line per listening service and the Web Manager's address; no "Starting factory <... at 0x...>"."""
    log = demo.server.log_text()
    assert f"Web Manager demo-manager on https://127.0.0.1:{demo.manager.port}/" in log
    assert "embedded LDAP directory demo-directory serves dc=demo,dc=example" in log
    assert " at 0x" not in log
