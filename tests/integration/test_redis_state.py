"""``[server] state = redis://``: two real sftpauth processes share bans and used TOTP codes through a real Redis.

The nodes ``a`` and ``b`` are two ``twistd -n sftpauth`` processes with the
same configuration apart from ports and audit logs; the LDAP method (with
the TOTP extension) uses the session's real slapd. The last test stops
Redis under them and starts it again.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyotp
import pytest

from sftpauth.auth.passwords import hash_password

from .policy_helpers import FTP_REFUSAL, ftp_fails, ftp_login, greeting
from .redis_fixture import start_redis
from .server import SftpauthServer, free_port
from .slapd import SlapdError
from .sftp_fixtures import plugin_on_python_path

BASE = "dc=example,dc=com"
USERS = f"ou=redis-totp,{BASE}"
SECRETS = {"rtina": "NBSWY3DPEB3W64TMMQQHIZLTORUW4ZZR", "rtom": "MFRGGZDFMZTWQ2LKNNWG23TPOBYXE43U"}
FAILURE = "530 Login failed."


def code(uid: str) -> str:
    return pyotp.TOTP(SECRETS[uid]).now()


def users_ldif() -> str:
    parts = [f"dn: {USERS}\nobjectClass: organizationalUnit\nou: redis-totp\n"]
    for uid, secret in SECRETS.items():
        parts.append(
            f"dn: uid={uid},{USERS}\nobjectClass: inetOrgPerson\nobjectClass: sftpauthTestUser\nuid: {uid}\n"
            f"cn: {uid}\nsn: {uid}\nuserPassword: {uid}-pass\n"
            f"totpSharedSecret: otpauth://totp/Srv:{uid}?secret={secret}&issuer=Srv\n"
        )
    return "\n".join(parts)


class Node:
    def __init__(self, folder: Path, redis_url: str, slapd):
        self.folder = folder
        self.port = free_port()
        config = f"""
[server]
authentications = DEFAULT-AUTHENTICATION, directory
audit_log = {folder / "audit.jsonl"}
state = {redis_url}

[services/ftp]
type = ftp
port = {self.port}

[security-policies/DEFAULT-SECURITY-POLICY]
source_ip_ban_after_count = 4

[authentications/directory]
type = ldap
address = 127.0.0.1
port = {slapd.port}
bind_dn = {USERS}
username_attribute = uid
extension_entry_point = python:sftpauth.ldap.totp.AugmentedTOTP
extension_configuration = {{"mfa_attribute": "totpSharedSecret"}}

[groups/DEFAULT_GROUP]
home_folder_path = {folder / "homes"}
create_home_folder = yes

[accounts/alice]
password = {hash_password("alice-pass")}
"""
        self.server = SftpauthServer(folder, config, ports=(self.port,))

    def events(self, kind: str) -> list[dict]:
        return [event for event in self.server.audit_events() if event["event"] == kind]

    def audit(self, predicate, timeout: float = 10.0) -> dict:
        return self.server.wait_for_audit(predicate, timeout=timeout)

    def wait_for_log(self, text: str, timeout: float = 20.0) -> None:
        self.server.wait_for_log(lambda logged: text in logged, timeout=timeout)


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def nodes(tmp_path_factory, redis, slapd):
    """Two sftpauth processes on one Redis database and one slapd."""
    slapd.add_ldif(users_ldif())
    a = Node(tmp_path_factory.mktemp("node-a"), redis.url, slapd)
    b = Node(tmp_path_factory.mktemp("node-b"), redis.url, slapd)
    with plugin_on_python_path():
        a.server.start()
        try:
            b.server.start()
        except BaseException:
            a.server.stop()
            raise
    try:
        a.wait_for_log("connected to Redis")
        b.wait_for_log("connected to Redis")
        yield a, b
    finally:
        statuses = [a.server.stop(), b.server.stop()]
    for node in (a, b):
        log = node.server.log_text()
        assert "Traceback" not in log, node.server.log_tail(200)
    assert statuses == [0, 0]


def test_failures_spread_over_two_nodes_add_up_to_one_ban(nodes, redis):
    """Two failures on each node reach the limit of four; one ban event; both nodes refuse the address."""
    a, b = nodes
    source = "127.0.0.60"
    for node in (a, b, a, b):
        assert ftp_fails(node.port, "alice", "wrong", source) == FAILURE
    bans = [e for node in (a, b) for e in node.events("ban") if e["peer"] == source]
    assert len(bans) == 1 and bans[0]["failures"] == 4
    assert int(redis.command("PTTL", f"sftpauth:ban:DEFAULT-SECURITY-POLICY:{source}").lstrip(":")) > 3_500_000
    assert greeting(a.port, source) == FTP_REFUSAL
    assert greeting(b.port, source) == FTP_REFUSAL
    ftp_login(a.port, "alice", "alice-pass", "127.0.0.62").quit()


def test_totp_code_used_on_one_node_is_refused_on_the_other(nodes):
    """A code that let rtina in on node a is a replay on node b."""
    a, b = nodes
    password = "rtina-pass" + code("rtina")
    ftp_login(a.port, "rtina", password, "127.0.0.63").quit()
    assert ftp_fails(b.port, "rtina", password, "127.0.0.63") == FAILURE
    b.audit(lambda e: e["event"] == "authentication" and e["username"] == "rtina" and e["reason"] == "totp-replayed")


def test_redis_outage_fails_totp_closed_bans_per_node_and_recovers(nodes, redis):
    """Without Redis: TOTP logins are refused, local logins work, bans are per node; then Redis comes back."""
    a, b = nodes
    redis.stop()
    try:
        a.wait_for_log("Redis is unreachable")
        b.wait_for_log("Redis is unreachable")
        assert ftp_fails(a.port, "rtom", "rtom-pass" + code("rtom"), "127.0.0.64") == FAILURE
        a.audit(lambda e: e["event"] == "authentication" and e["username"] == "rtom" and e["reason"] == "service-unavailable")
        started = time.monotonic()
        ftp_login(a.port, "alice", "alice-pass", "127.0.0.65").quit()
        assert time.monotonic() - started < 3  # no waiting on Redis
        source = "127.0.0.61"
        for _ in range(4):
            ftp_fails(a.port, "alice", "wrong", source)
        a.audit(lambda e: e["event"] == "ban" and e["peer"] == source)
        assert greeting(a.port, source) == FTP_REFUSAL
        assert greeting(b.port, source).startswith(b"220 ")  # b never saw those failures
    finally:
        redis.start()
    a.wait_for_log("Redis answers again")
    b.wait_for_log("Redis answers again")
    password = "rtom-pass" + code("rtom")
    ftp_login(a.port, "rtom", password, "127.0.0.66").quit()
    assert ftp_fails(b.port, "rtom", password, "127.0.0.66") == FAILURE
    b.audit(lambda e: e["event"] == "authentication" and e["username"] == "rtom" and e["reason"] == "totp-replayed")


# -- a Redis that answers but refuses, or answers late ------------------------------------


@pytest.fixture
def lone_node(tmp_path, slapd):
    """One node on a Redis of its own (the test may lock it or slow it down); the test starts the node."""
    try:
        slapd.add_ldif(users_ldif())
    except SlapdError as error:
        assert "Already exists" in str(error)  # added by the module's nodes
    redis = start_redis(tmp_path / "redis")
    node = Node(tmp_path / "node", redis.url, slapd)
    try:
        yield node, redis
    finally:
        node.server.stop()
        redis.stop()
    assert "Traceback" not in node.server.log_text(), node.server.log_tail(200)


def start(node: Node) -> None:
    with plugin_on_python_path():
        node.server.start()


def redis_commands(redis, *lines: str) -> bytes:
    """Send inline commands in one go (AUTH then a command); the raw replies."""
    import socket

    with socket.create_connection(("127.0.0.1", redis.port), timeout=5) as connection:
        connection.sendall("".join(line + "\r\n" for line in lines).encode())
        time.sleep(0.2)
        return connection.recv(65536)


def timed_login(node: Node, username: str, password: str, source: str) -> float:
    started = time.monotonic()
    ftp_login(node.port, username, password, source).quit()
    return time.monotonic() - started


def test_a_redis_that_refuses_the_node_is_down_at_once_and_retried_until_it_does_not(lone_node):
    """A Redis that wants a password (or has no such database, or is not Redis) refuses SELECT.

    txredisapi then gave up for good: the node never said Redis was down,
    every login waited the 2 s timeout for a connection, for as long as
    the node ran, and fixing Redis changed nothing.
    """
    node, redis = lone_node
    assert redis_commands(redis, "CONFIG SET requirepass locked-out").startswith(b"+OK")
    start(node)
    node.wait_for_log("Redis is unreachable (could not set dbid=0: NOAUTH Authentication required.)")
    assert timed_login(node, "alice", "alice-pass", "127.0.0.71") < 1.0  # bans: this node's own, no waiting
    started = time.monotonic()
    assert ftp_fails(node.port, "rtom", "rtom-pass" + code("rtom"), "127.0.0.72") == FAILURE
    assert time.monotonic() - started < 1.6  # the one-second answer to a failure, and no Redis wait
    node.audit(lambda e: e["event"] == "authentication" and e["username"] == "rtom" and e["reason"] == "service-unavailable")
    assert redis_commands(redis, "AUTH locked-out", 'CONFIG SET requirepass ""').endswith(b"+OK\r\n")
    node.wait_for_log("Redis answers again")
    ftp_login(node.port, "rtom", "rtom-pass" + code("rtom"), "127.0.0.73").quit()
    log = node.server.log_text()
    assert log.count("Redis is unreachable") == 1
    assert "Redis error" not in log  # txredisapi's own line at each refused retry


def test_a_redis_that_stops_answering_costs_one_timeout_not_one_per_connection(lone_node):
    """CLIENT PAUSE: the first command waits the 2 s timeout; Redis is then down for every command at once."""
    node, redis = lone_node
    start(node)
    node.wait_for_log("connected to Redis")
    assert redis_commands(redis, "CLIENT PAUSE 6000 ALL").startswith(b"+OK")
    first = timed_login(node, "alice", "alice-pass", "127.0.0.74")
    assert 1.5 < first < 3.5, first  # one timeout (2 s)
    node.wait_for_log("Redis is unreachable (no answer within 2s)")
    assert timed_login(node, "alice", "alice-pass", "127.0.0.75") < 1.0
    node.wait_for_log("Redis answers again", timeout=30)


def test_a_redis_that_refuses_writes_fails_totp_closed_says_so_and_recovers(lone_node):
    """QA: a Redis made a read-only replica refused every write; the node stayed "up" and said nothing of it."""
    node, redis = lone_node
    start(node)
    node.wait_for_log("connected to Redis")
    assert redis_commands(redis, f"REPLICAOF 127.0.0.1 {free_port()}").startswith(b"+OK")
    try:
        assert ftp_fails(node.port, "rtom", "rtom-pass" + code("rtom"), "127.0.0.76") == FAILURE
        node.audit(lambda e: e["event"] == "authentication" and e["username"] == "rtom" and e["reason"] == "service-unavailable")
        node.wait_for_log("Redis refuses commands (READONLY You can't write against a read only replica.)")
    finally:
        assert redis_commands(redis, "REPLICAOF NO ONE").startswith(b"+OK")
    ftp_login(node.port, "rtom", "rtom-pass" + code("rtom"), "127.0.0.77").quit()  # the code was never stored
    node.wait_for_log("Redis accepts writes again")
    assert node.server.log_text().count("Redis refuses commands") == 1


def test_a_cause_that_changes_during_an_outage_is_logged_once(lone_node):
    """QA: Redis came back wanting a password; the log kept "the connection was closed" and never said NOAUTH."""
    node, redis = lone_node
    start(node)
    node.wait_for_log("connected to Redis")
    redis_commands(redis, "CONFIG SET requirepass locked-out", "CLIENT KILL TYPE normal")
    node.wait_for_log("Redis is unreachable (the connection was closed)")
    node.wait_for_log("Redis is still unreachable, now: could not set dbid=0: NOAUTH Authentication required.")
    time.sleep(6)  # more refused retries: nothing more to say
    assert redis_commands(redis, "AUTH locked-out", 'CONFIG SET requirepass ""').endswith(b"+OK\r\n")
    node.wait_for_log("Redis answers again")
    log = node.server.log_text()
    assert log.count("Redis is unreachable") == 1 and log.count("Redis is still unreachable") == 1, node.server.log_tail(40)
