"""LDAP server failover against real slapd servers: a crash mid-traffic, a black hole, probes, test-login.

The crash test runs the real ``twistd -n sftpauth`` with an FTP service and
drives a stream of FTP logins while the first slapd is SIGKILLed. The
black-hole tests run the LDAP method in-process (pytest-twisted's reactor)
so they can read each login's trace and the pool's server states.
"""

from __future__ import annotations

import ftplib
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytest_twisted
from twisted.internet import task
from twisted.internet.protocol import Factory, Protocol

from sftpauth.auth.credentials import LoginRequest
from sftpauth.auth.errors import LoginFailed
from sftpauth.auth.ldap.client import DOWN, UP
from sftpauth.auth.ldap.method import LDAPMethod
from sftpauth.auth.trace import Trace
from sftpauth.config.loader import parse_configuration

from .conftest import DIRECTORY_LDIF
from .manager_helpers import HTTPSClient
from .server import SftpauthServer, free_port
from .slapd import BlackHole, SlapdServer

pytestmark = pytest.mark.slapd

SFTPAUTH = str(Path(sys.executable).with_name("sftpauth"))
USERS = {"alice": "alice-pass", "bob": "bob-pass"}
TIMEOUT = 1
RETRY = 2


def _directory() -> SlapdServer:
    server = SlapdServer().start()
    server.add_ldif_file(DIRECTORY_LDIF)
    return server


@pytest.fixture
def two_directories():
    """Two real slapd servers holding the same data."""
    first = _directory()
    try:
        second = _directory()
    except BaseException:
        first.stop()
        raise
    yield first, second
    first.stop()
    second.stop()


def ldap_method_section(addresses: str, retry_interval: int = RETRY, extra: str = "") -> str:
    return textwrap.dedent(
        f"""
        [authentications/ldap]
        type = ldap
        address = {addresses}
        timeout = {TIMEOUT}
        retry_interval = {retry_interval}
        bind_dn_type = search
        bind_dn = ou=people,dc=example,dc=com
        username_attribute = uid
        service_account_dn = cn=admin,dc=example,dc=com
        service_account_password = admin-secret
        base_groups = ldap-users
        """
    ) + extra


def configuration_text(folder: Path, method: str) -> str:
    return (
        textwrap.dedent(
            f"""
            [server]
            authentications = ldap
            audit_log = {folder}/audit.jsonl

            [security-policies/DEFAULT-SECURITY-POLICY]
            source_ip_ban_after_count = 1000

            [groups/ldap-users]
            home_folder_path = {folder}/homes
            create_home_folder = yes
            """
        )
        + method
    )


# -- a crash in the middle of a stream of logins (real twistd, real FTP clients) ----


def _login_stream(port: int, username: str, stop: threading.Event, results: list) -> None:
    while not stop.is_set():
        started = time.monotonic()
        try:
            client = ftplib.FTP(timeout=10)
            client.connect("127.0.0.1", port)
            try:
                client.login(username, USERS[username])
                ok, error = True, ""
            except ftplib.error_perm as failure:
                ok, error = False, str(failure)
            finally:
                client.close()
        except OSError as failure:
            ok, error = False, repr(failure)
        results.append((started, time.monotonic(), ok, error))


def _wait_for_logins(streams: list[list], counted, wanted: int, timeout: float = 60.0) -> None:
    """Until ``wanted`` finished logins of the streams are ``counted``: how fast they come is the machine's business."""
    deadline = time.monotonic() + timeout
    while sum(1 for results in streams for login in list(results) if counted(login)) < wanted:
        assert time.monotonic() < deadline, f"fewer than {wanted} logins in {timeout}s: {[len(results) for results in streams]}"
        time.sleep(0.05)


def test_a_crashed_server_costs_at_most_the_logins_in_flight(two_directories, tmp_path):
    """SIGKILL the first slapd during a stream of FTP logins: every login that starts afterwards succeeds through the second."""
    first, second = two_directories
    ftp_port = free_port()
    method = ldap_method_section(f"127.0.0.1:{first.port}, 127.0.0.1:{second.port}")
    config = configuration_text(tmp_path, method) + textwrap.dedent(
        f"""
        [services/ftp]
        type = ftp
        address = 127.0.0.1
        port = {ftp_port}
        """
    )
    server = SftpauthServer(tmp_path, config, ports=(ftp_port,))
    try:
        server.start()
    except RuntimeError as error:
        if "Unknown command: sftpauth" in str(error):
            pytest.skip("twistd does not find the sftpauth plugin")
        raise
    stop = threading.Event()
    streams = [[] for _ in range(3)]
    workers = [
        threading.Thread(target=_login_stream, args=(ftp_port, username, stop, results), daemon=True)
        for username, results in zip(("alice", "bob", "alice"), streams)
    ]
    try:
        for worker in workers:
            worker.start()
        _wait_for_logins(streams, lambda login: True, 10)
        killed_at = time.monotonic()
        first.kill()
        _wait_for_logins(streams, lambda login: login[0] > killed_at, 10)
        stop.set()
        for worker in workers:
            worker.join(timeout=15)
    finally:
        stop.set()
        status = server.stop()
    assert status == 0, server.log_tail()

    logins = [login for results in streams for login in results]
    before = [login for login in logins if login[1] < killed_at]
    after = [login for login in logins if login[0] > killed_at]
    in_flight = [login for login in logins if login[0] <= killed_at <= login[1]]
    assert len(before) >= 10 and all(ok for _, _, ok, _ in before), before[:5]
    assert len(after) >= 10
    assert [login for login in after if not login[2]] == []
    assert len(in_flight) <= len(workers)
    events = [event for event in server.audit_events() if event.get("event") == "authentication"]
    assert {event["reason"] for event in events if event["outcome"] == "failure"} <= {"service-unavailable"}
    log = server.log_text()
    assert f"LDAP method ldap: servers 127.0.0.1:{first.port}, 127.0.0.1:{second.port} (plain LDAP)" in log
    assert f"LDAP server 127.0.0.1:{first.port} of ldap is down" in log
    assert "Starting factory <sftpauth.auth.ldap" not in log  # no log line per LDAP connection
    assert "Unhandled" not in log and "Traceback" not in log


# -- a black hole: one timeout, then nothing; back after retry_interval -------------


def build_method(tmp_path, addresses: str, retry_interval: int = RETRY) -> LDAPMethod:
    from twisted.internet import reactor

    text = configuration_text(tmp_path, ldap_method_section(addresses, retry_interval))
    configuration = parse_configuration(text, str(tmp_path / "sftpauth.ini"), str(tmp_path), {})
    return LDAPMethod(configuration.authentications["ldap"], configuration, reactor)


async def login(method: LDAPMethod, username: str = "alice"):
    """(account or LoginFailed, trace, seconds) of one login through the method."""
    trace = Trace()
    request = LoginRequest(username, USERS[username], "ftp", "ftp", "192.0.2.1", trace=trace)
    started = time.monotonic()
    try:
        outcome = await method.authenticate(request)
    except LoginFailed as failure:
        outcome = failure
    return outcome, trace, time.monotonic() - started


def attempts_on(trace: Trace, port: int) -> list[str]:
    """Trace steps where the login used (not skipped) the server on ``port``: connect and failover."""
    return [
        step.detail
        for step in trace.steps
        if step.action in ("connect", "failover") and f"127.0.0.1:{port}" in step.detail
    ]


def skips_of(trace: Trace, port: int) -> list[str]:
    return [step.detail for step in trace.steps if step.action == "skip" and f"127.0.0.1:{port}" in step.detail]


def assert_no_pool_calls_left(method: LDAPMethod) -> None:
    from twisted.internet import reactor

    mine = [call for call in reactor.getDelayedCalls() if getattr(call.func, "__self__", None) is method.pool]
    assert mine == []


async def sleep(seconds: float) -> None:
    from twisted.internet import reactor

    await task.deferLater(reactor, seconds, lambda: None)


@pytest.mark.parametrize("accept", [True, False], ids=["accepts-never-answers", "never-accepts"])
@pytest_twisted.ensureDeferred
async def test_a_black_hole_costs_one_timeout_then_is_skipped_and_comes_back(slapd, tmp_path, accept):
    """The first login pays one timeout on a dead first server, later ones skip it, and a probe brings it back once restarted."""
    hole = BlackHole(accept=accept)
    restarted = None
    method = build_method(tmp_path, f"127.0.0.1:{hole.port}, 127.0.0.1:{slapd.port}")
    method.pool.start()
    try:
        account, trace, seconds = await login(method)
        assert not isinstance(account, LoginFailed), trace.steps
        assert account.dn == "uid=alice,ou=Engineering,ou=people,dc=example,dc=com"
        dead = " | ".join(attempts_on(trace, hole.port))
        assert ("no answer to BIND within 1s" if accept else "connection timed out after 1s") in dead
        assert attempts_on(trace, slapd.port)
        assert seconds >= 0.9 * TIMEOUT
        if accept:
            assert hole.accepted == 1
        states = method.pool.states()
        assert (states[0].status, states[1].status) == (DOWN, UP)

        for username in ("bob", "alice", "bob", "alice", "bob"):
            account, trace, _ = await login(method, username)
            assert not isinstance(account, LoginFailed), trace.steps
            assert attempts_on(trace, hole.port) == []
            # One skip per connection the login takes (search logins BIND on a second kept connection).
            skips = skips_of(trace, hole.port)
            assert 1 <= len(skips) <= 2 and all(f"127.0.0.1:{hole.port} is down" in skip for skip in skips), skips

        hole.close()
        restarted = SlapdServer(port=hole.port).start()
        restarted.add_ldif_file(DIRECTORY_LDIF)
        deadline = time.monotonic() + 2 * RETRY + 2 * TIMEOUT + 5
        while method.pool.states()[0].status != UP:
            assert time.monotonic() < deadline, method.pool.states()
            await sleep(0.1)
        account, trace, _ = await login(method)
        assert not isinstance(account, LoginFailed), trace.steps
        assert attempts_on(trace, hole.port) and f"connected to 127.0.0.1:{hole.port}" in attempts_on(trace, hole.port)[0]
    finally:
        method.pool.stop()
        hole.close()
        if restarted is not None:
            restarted.stop()
    assert_no_pool_calls_left(method)


@pytest_twisted.ensureDeferred
async def test_two_hung_servers_of_three_cost_a_timeout_each_and_the_third_serves_the_login(slapd, tmp_path):
    """Every server is tried once per login: two that hang are each paid one timeout, then marked down and skipped."""
    holes = [BlackHole(accept=True), BlackHole(accept=True)]
    method = build_method(tmp_path, ", ".join(f"127.0.0.1:{port}" for port in [hole.port for hole in holes] + [slapd.port]))
    method.pool.start()
    try:
        account, trace, seconds = await login(method)
        assert not isinstance(account, LoginFailed), trace.steps
        assert account.dn == "uid=alice,ou=Engineering,ou=people,dc=example,dc=com"
        for hole in holes:
            assert "no answer to BIND within 1s" in " | ".join(attempts_on(trace, hole.port))
        assert seconds >= 2 * 0.9 * TIMEOUT
        assert [state.status for state in method.pool.states()] == [DOWN, DOWN, UP]
        account, trace, seconds = await login(method, "bob")
        assert not isinstance(account, LoginFailed), trace.steps
        assert all(attempts_on(trace, hole.port) == [] for hole in holes)
        assert seconds < TIMEOUT
    finally:
        method.pool.stop()
        for hole in holes:
            hole.close()
    assert_no_pool_calls_left(method)


@pytest_twisted.ensureDeferred
async def test_with_every_server_dead_logins_fail_fast_and_never_accept(tmp_path):
    """A lone dead server: the first login fails after one timeout, the next ones fail at once without touching it."""
    hole = BlackHole(accept=True)
    method = build_method(tmp_path, f"127.0.0.1:{hole.port}", retry_interval=60)
    method.pool.start()
    try:
        failure, trace, seconds = await login(method)
        assert isinstance(failure, LoginFailed) and failure.reason == "service-unavailable"
        assert "no answer to BIND within 1s" in failure.explanation
        assert seconds >= 0.9 * TIMEOUT
        for _ in range(3):
            failure, trace, seconds = await login(method)
            assert isinstance(failure, LoginFailed) and failure.reason == "service-unavailable"
            assert attempts_on(trace, hole.port) == []
            assert "down" in failure.explanation
        assert hole.accepted == 1
    finally:
        method.pool.stop()
        hole.close()
    assert_no_pool_calls_left(method)


class _Garbage(Protocol):
    """Answers anything with an LDAPMessage that holds a message ID and no operation."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"\x30\x03\x02\x01\x01")


class _HTTPServer(Protocol):
    """An HTTP server on the LDAP port: answers any request with a 400 page, and keeps the connection."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/html\r\n\r\n" + b"<p>bad request</p>" * 20)


class _HugeAnswer(Protocol):
    """Announces a 2 GiB answer to anything and starts sending it (1 MiB, in 64 KiB writes)."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"\x30\x84\x7f\xff\xff\xff\x02\x01\x01")
        for _ in range(16):
            self.transport.write(b"\0" * 65536)


@pytest.mark.parametrize(
    "server, reason",
    [
        (_Garbage, "is not LDAP (it cannot be decoded"),
        (_HTTPServer, "is not LDAP (it does not begin with an LDAP message: byte 0x48)"),
        (_HugeAnswer, "is not LDAP (a message of 2147483653 bytes, over the limit of 16 MiB)"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_server_answering_what_is_not_ldap_is_skipped_at_once(slapd, tmp_path, server, reason):
    """A first server whose answer is not LDAP is marked down with that reason when it arrives, not at the timeout."""
    from twisted.internet import reactor

    port = reactor.listenTCP(0, Factory.forProtocol(server), interface="127.0.0.1")
    garbage = port.getHost().port
    method = build_method(tmp_path, f"127.0.0.1:{garbage}, 127.0.0.1:{slapd.port}")
    try:
        account, trace, _ = await login(method)
        assert not isinstance(account, LoginFailed), trace.steps
        attempts = " | ".join(attempts_on(trace, garbage))
        assert reason in attempts and "no answer" not in attempts
        first, second = method.pool.states()
        assert (first.status, second.status) == (DOWN, UP)
        assert "the answer to BIND is not LDAP" in first.last_error
    finally:
        method.pool.stop()
        await port.stopListening()


# -- test-login prints the state of each server -------------------------------------


def test_test_login_prints_one_line_per_server_with_its_state(slapd, tmp_path):
    """sftpauth test-login shows the refused server as down with its error and the one used as up."""
    dead_port = free_port()
    config = tmp_path / "sftpauth.ini"
    config.write_text(
        configuration_text(tmp_path, ldap_method_section(f"127.0.0.1:{dead_port}, 127.0.0.1:{slapd.port}")),
        encoding="utf-8",
    )
    result = subprocess.run(
        [SFTPAUTH, "test-login", str(config), "alice", "--password-stdin"],
        input="alice-pass\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "result: ACCEPTED by ldap as 'alice'" in lines
    start = lines.index("LDAP servers of ldap:")
    dead, alive = lines[start + 1], lines[start + 2]
    assert dead.split()[0] == f"127.0.0.1:{dead_port}"
    assert "down for" in dead and "connection refused" in dead
    assert alive.split()[0] == f"127.0.0.1:{slapd.port}"
    assert "up for" in alive and "last connection in" in alive
    assert "alice-pass" not in result.stdout


# -- with workers, the parent's Web Manager shows what the workers found ----------------------


def test_with_workers_the_web_manager_shows_a_server_the_workers_found_down(two_directories, tmp_path):
    """workers = 2: a slapd killed after start is found down by a worker's login, and the parent's /health says so.

    The parent never logs in through LDAP here: before workers told it, its
    /health kept the first slapd "up" (its first probe) for as long as
    sftpauth ran.
    """
    first, second = two_directories
    ftp_port, web_port = free_port(), free_port()
    method = ldap_method_section(f"127.0.0.1:{first.port}, 127.0.0.1:{second.port}", retry_interval=600)
    config = configuration_text(tmp_path, method).replace(
        "[server]\n", f"[server]\nworkers = 2\ndata_folder = {tmp_path}/data\n", 1
    ) + textwrap.dedent(
        f"""
        [services/ftp]
        type = ftp
        address = 127.0.0.1
        port = {ftp_port}

        [services/web]
        type = manager
        address = 127.0.0.1
        port = {web_port}
        """
    )
    server = SftpauthServer(tmp_path, config, ports=(ftp_port, web_port))
    server.start()
    try:
        server.ready_workers(2, timeout=30)
        web = HTTPSClient(SimpleNamespace(port=web_port, certificate=tmp_path / "data" / "manager" / "certificate.pem"))

        def statuses() -> list[str]:
            status, body = web.get_json("/health")
            assert status == 200, body
            return [server_state["status"] for server_state in body["ldap"]["ldap"]["servers"]]

        _wait_until(lambda: statuses() == ["up", "up"], "the parent's first probes")
        first.kill()
        for _ in range(4):  # the kernel spreads them over the workers; one meeting the dead server is enough
            client = ftplib.FTP(timeout=10)
            client.connect("127.0.0.1", ftp_port)
            client.login("alice", USERS["alice"])
            client.quit()
        _wait_until(lambda: statuses() == ["down", "up"], "the first slapd down on /health")
        status, body = web.get_json("/health")
        assert body["status"] == "ok" and body["ldap"]["ldap"]["up"] == 1
    finally:
        assert server.stop() == 0, server.log_tail()
    assert "of ldap is down" in server.log_text()  # written once, by the worker that found it


def _wait_until(condition, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:g}s: {what}"
        time.sleep(0.1)
