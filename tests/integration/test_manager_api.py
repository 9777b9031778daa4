"""The Web Manager's JSON API, /health and /metrics on a real twistd, against a real slapd, over real TLS."""

from __future__ import annotations

import ftplib
import hashlib
import re
import socket
import ssl
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from .manager_helpers import ADMIN_PASSWORD, AUDITOR_PASSWORD, HTTPSClient, ManagerServer

pytestmark = pytest.mark.slapd


@pytest.fixture(scope="module")
def manager(slapd, tmp_path_factory):
    """One sftpauth process with a Web Manager, FTP and the LDAP method, for this module."""
    server = ManagerServer(tmp_path_factory.mktemp("manager-api"), slapd).start()
    yield server
    assert server.stop() in (0, None)


@pytest.fixture
def client(manager):
    """An HTTPS client trusting only the manager's generated certificate."""
    return HTTPSClient(manager)


def test_generated_certificate_is_served_and_its_fingerprint_logged(manager):
    """The self-signed certificate verifies for 127.0.0.1, and its SHA-256 fingerprint is in the log."""
    context = ssl.create_default_context(cafile=str(manager.certificate))
    with socket.create_connection(("127.0.0.1", manager.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    fingerprint = ":".join(f"{byte:02X}" for byte in hashlib.sha256(der).digest())
    assert f"SHA-256 fingerprint {fingerprint}" in manager.server.log_tail(200)
    on_disk = x509.load_pem_x509_certificate(manager.certificate.read_bytes())
    assert on_disk.fingerprint(hashes.SHA256()) == hashlib.sha256(der).digest()


def test_health_without_login(client):
    """/health answers JSON without a session: version, every service running, the LDAP server."""
    status, body = client.get_json("/health")
    assert status == 200
    assert body["status"] in ("ok", "degraded")
    assert body["services"]["web"] == {"type": "manager", "state": "running"}
    assert body["services"]["ftp"]["state"] == "running"
    assert body["ldap"]["ldap"]["total"] == 1


def test_api_needs_login(client):
    """Without a session the API answers 401."""
    assert client.get_json("/api/v1/authentications")[0] == 401
    assert client.post_json("/api/v1/test_login", {"username": "a", "password": "b"})[0] == 401


def test_ldap_administrator_logs_in_and_lists_authentications(client, slapd):
    """alice (in cn=admins) logs in through the chain in manager mode and sees the LDAP server up."""
    status, session = client.login("alice", "alice-pass")
    assert status == 200, session
    assert session["roles"] == ["DEFAULT-ROLE"] and session["method"] == "ldap"
    status, body = client.get_json("/api/v1/authentications")
    assert status == 200
    ldap = {item["id"]: item for item in body["authentications"]}["ldap"]
    (server,) = ldap["servers"]
    assert server["address"] == f"127.0.0.1:{slapd.port}" and server["status"] == "up"
    assert server["latency_ms"] is not None


def test_ldap_user_outside_manager_search_filter_is_refused(client, manager):
    """carol may use FTP but is not in cn=admins: the Web Manager refuses her, the audit says why."""
    status, body = client.login("carol", "carol-pass")
    assert status == 401 and body == {"error": "login failed"}
    event = manager.server.wait_for_audit(
        lambda entry: entry.get("username") == "carol" and entry.get("service") == "web" and entry.get("event") == "authentication"
    )
    assert event["outcome"] == "failure" and event["reason"] == "filter-mismatch"
    assert event["protocol"] == "manager"


def test_verify_connection_and_test_login_through_the_api(client, slapd):
    """verify_connection runs the verify-ldap checks; test_login explains a refused manager login step by step."""
    client.login("admin", ADMIN_PASSWORD)
    assert client.post_json("/api/v1/authentications/ldap/verify_connection", {}, csrf=False)[0] == 403
    status, report = client.post_json("/api/v1/authentications/ldap/verify_connection", {})
    assert status == 200, report
    assert report["failures"] == 0
    assert {check["step"] for check in report["checks"]} >= {"tcp", "bind", "search"}
    status, outcome = client.post_json("/api/v1/test_login", {"username": "carol", "password": "carol-pass", "manager": True})
    assert status == 200
    assert outcome["accepted"] is False and outcome["reason"] == "filter-mismatch"
    assert any("memberOf" in step["detail"] for step in outcome["steps"])
    assert any(line.startswith("LDAP servers of ldap") for line in outcome["servers"])
    status, outcome = client.post_json("/api/v1/test_login", {"username": "alice", "password": "alice-pass"})
    assert outcome["accepted"] is True and outcome["account"]["groups"] == ["ldap-users"]
    assert "alice-pass" not in str(outcome)


def test_read_only_administrator_cannot_run_actions(client):
    """The auditor (permissions = configuration, read) reads events but gets 403 for actions."""
    client.login("auditor", AUDITOR_PASSWORD)
    assert client.get_json("/api/v1/events")[0] == 200
    status, body = client.post_json("/api/v1/test_login", {"username": "alice", "password": "alice-pass"})
    assert status == 403 and "read-only" in body["error"]
    assert client.post_json("/api/v1/authentications/ldap/verify_connection", {})[0] == 403


def test_events_and_metrics_see_ftp_logins(client, manager):
    """An FTP login shows in /api/v1/events and in the Prometheus counters and session gauge."""
    ftp = ftplib.FTP(timeout=10)
    ftp.connect("127.0.0.1", manager.ftp_port)
    ftp.login("alice", "alice-pass")
    try:
        client.login("admin", ADMIN_PASSWORD)
        status, body = client.get_json("/api/v1/events?username=alice&outcome=success")
        assert status == 200
        assert any(event["service"] == "ftp" for event in body["events"])
        status, _, data = client.request("GET", "/metrics")
        assert status == 200
        text = data.decode()
        assert re.search(r'sftpauth_login_attempts_total\{method="ldap",outcome="success",service="ftp"\} [1-9]', text)
        assert re.search(r'sftpauth_open_sessions\{service="ftp"\} 1\.0', text)
        assert re.search(r'sftpauth_ldap_operation_seconds_count\{method="ldap",operation="bind",server="127\.0\.0\.1:\d+"\} [1-9]', text)
        assert re.search(r'sftpauth_ldap_server_up\{method="ldap",server="127\.0\.0\.1:\d+"\} 1\.0', text)
    finally:
        ftp.quit()


def test_metrics_need_a_session(client):
    """/metrics is refused without a session (metrics_require_login defaults to yes)."""
    status, _, _ = client.request("GET", "/metrics")
    assert status == 401


def test_header_preauthentication_from_an_untrusted_address_is_ignored(client, manager):
    """preauth-username from 127.0.0.1 (no trusted proxy configured) opens nothing and is audited."""
    status, _, _ = client.request("GET", "/api/v1/session", headers={"preauth-username": "mallory"})
    assert status == 401
    event = manager.server.wait_for_audit(lambda entry: entry.get("username") == "mallory")
    assert event["reason"] == "preauth-disabled" and event["outcome"] == "failure"


def test_logout_ends_the_api_session(client):
    """POST /api/v1/logout with the token ends the session."""
    client.login("admin", ADMIN_PASSWORD)
    assert client.get_json("/api/v1/session")[0] == 200
    status, body = client.post_json("/api/v1/logout", {})
    assert status == 200 and body == {"logged_out": True}
    assert client.get_json("/api/v1/session")[0] == 401


def raw_exchange(manager, data: bytes, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Send raw bytes over TLS; what the server answered within ``timeout``, and whether it then closed."""
    context = ssl.create_default_context(cafile=str(manager.certificate))
    with socket.create_connection(("127.0.0.1", manager.port), timeout=timeout) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(data)
            answer = b""
            try:
                while chunk := tls.recv(65536):
                    answer += chunk
            except (TimeoutError, ConnectionError, ssl.SSLError):
                return answer, False
            return answer, True


def read_to_close(tls: ssl.SSLSocket) -> bytes:
    """Everything the server sends until it closes (or resets) the connection."""
    tls.settimeout(5)
    answer = b""
    try:
        while chunk := tls.recv(65536):
            answer += chunk
    except (ConnectionError, ssl.SSLError):
        pass
    return answer


LOGIN_HEAD = b"POST /api/v1/login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize(
    "data, status",
    [
        # A declared 100 MB body: refused after the headers, before a byte of it is sent.
        (LOGIN_HEAD + b"Content-Length: 100000000\r\n\r\n", b"413"),
        (LOGIN_HEAD + b"Content-Length: " + b"9" * 5000 + b"\r\n\r\n", b"413"),  # a number int() refuses
        # 80 KiB of chunks and no last chunk: refused as it passes 64 KiB.
        (LOGIN_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + (b"4000\r\n" + b" " * 0x4000 + b"\r\n") * 5, b"413"),
        (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: " + b"a" * 17000 + b"\r\n\r\n", b"431"),
        (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"414"),
    ],
)
def test_over_the_limits_is_answered_and_closed_at_once(manager, client, data, status):
    """Oversized bodies and lines get their status within seconds and a close; the manager goes on serving."""
    answer, closed = raw_exchange(manager, data)
    assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer[:200]
    assert closed
    assert client.get_json("/health")[0] == 200


def test_slow_senders_are_cut_off_at_request_timeout(slapd, tmp_path):
    """Slowloris: connections that trickle a request in, or never finish the TLS handshake, are closed at request_timeout.

    Three of them fill maximum_concurrent_connections = 3, so a real client is
    refused meanwhile; once they are cut off (408 for the started requests),
    it is served again.
    """
    server = ManagerServer(tmp_path, slapd, extra_manager="request_timeout = 2\nmaximum_concurrent_connections = 3\n").start()
    context = ssl.create_default_context(cafile=str(server.certificate))
    held = []
    try:
        silent = socket.create_connection(("127.0.0.1", server.port), timeout=10)  # TCP only: no TLS handshake
        held.append(silent)
        slow = []
        for _ in range(2):
            tls = context.wrap_socket(socket.create_connection(("127.0.0.1", server.port), timeout=10), server_hostname="127.0.0.1")
            held.append(tls)
            slow.append(tls)
        started = time.monotonic()
        answers = {}
        trickle = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 1000  # never a whole request
        sent = 0
        while len(answers) < len(slow) and time.monotonic() - started < 6:
            for tls in slow:
                if id(tls) in answers:
                    continue
                tls.setblocking(False)  # the server answered? (TLS 1.3 session tickets alone are not an answer)
                try:
                    first = tls.recv(65536)
                except ssl.SSLWantReadError:
                    first = None
                tls.setblocking(True)
                if first is None:
                    tls.sendall(trickle[sent : sent + 1])
                else:
                    answers[id(tls)] = first + (read_to_close(tls) if first else b"")
            sent += 1
            if time.monotonic() - started < 1:  # all three held: a fourth connection is refused
                with pytest.raises(OSError):
                    HTTPSClient(server).request("GET", "/health")
            time.sleep(0.25)
        assert time.monotonic() - started < 6
        for tls in slow:
            assert answers[id(tls)].startswith(b"HTTP/1.1 408 "), answers[id(tls)][:100]
        silent.settimeout(5)
        try:
            assert silent.recv(100) == b""  # closed, without a byte
        except ConnectionResetError:
            pass  # aborted: closed too
        assert HTTPSClient(server).get_json("/health")[0] == 200
        log = server.server.log_text()
        assert "no whole request within request_timeout (2 s)" in log
        assert "not a byte of a request within request_timeout (2 s)" in log
    finally:
        for sock in held:
            sock.close()
        server.stop()


def test_undecodable_client_input_is_a_400(manager, client):
    """A %ff path and JSON nested 10,000 deep are 400s, not 500s with a traceback in the log."""
    assert client.request("GET", "/static/%ff.css")[0] == 400
    client.login("admin", ADMIN_PASSWORD)
    assert client.post_json("/api/v1/authentications/%ff/verify_connection", {})[0] == 400
    deep = b"[" * 10000 + b"]" * 10000
    status, _, data = client.request("POST", "/api/v1/login", deep, {"Content-Type": "application/json"})
    assert status == 400 and b"not JSON" in data
    assert client.get_json("/health")[0] == 200
    log = manager.server.log_text()
    assert "#critical" not in log and "Traceback" not in log


def test_server_log_has_no_errors_and_no_passwords(manager):
    """After every request above, the twistd log has no traceback and no password."""
    log = manager.server.log_text()
    assert "Traceback" not in log and "Unhandled" not in log
    for secret in (ADMIN_PASSWORD, AUDITOR_PASSWORD, "alice-pass", "carol-pass"):
        assert secret not in log
    audit = (manager.folder / "audit.jsonl").read_text()
    for secret in (ADMIN_PASSWORD, AUDITOR_PASSWORD, "alice-pass", "carol-pass"):
        assert secret not in audit


def test_a_roles_source_ip_filter_refuses_logins_from_other_addresses(slapd, tmp_path):
    """SFTPPlus's [roles/..] source_ip_filter: DEFAULT-ROLE only from 10.0.0.0/8 refuses 127.0.0.1; auditors has none."""
    server = ManagerServer(
        tmp_path, slapd, extra_manager="\n[roles/DEFAULT-ROLE]\nsource_ip_filter = 10.0.0.0/8, ::1\n"
    ).start()
    try:
        for username, password in (("admin", ADMIN_PASSWORD), ("alice", "alice-pass")):
            status, body = HTTPSClient(server).login(username, password)
            assert status == 401 and body == {"error": "login failed"}
            event = server.server.wait_for_audit(
                lambda entry, name=username: entry.get("username") == name and entry.get("event") == "authentication"
            )
            assert event["reason"] == "role-source-filtered"
            assert event["detail"] == "127.0.0.1 is not in source_ip_filter of [roles/DEFAULT-ROLE]"
        status, session = HTTPSClient(server).login("auditor", AUDITOR_PASSWORD)
        assert status == 200 and session["roles"] == ["auditors"]
    finally:
        server.stop()
