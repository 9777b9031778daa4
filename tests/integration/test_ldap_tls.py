"""LDAPS and StartTLS against real slapd servers with certificates from a CA the tests make.

Each slapd serves StartTLS on ldap:// and LDAPS on ldaps://, with a good
certificate (localhost, 127.0.0.1, ::1), one for another host name, an
expired one, or one from a CA that is not trusted. Logins run through the
LDAP method in-process, so the tests read the trace and the pool's state.
"""

from __future__ import annotations

import textwrap

import pytest
import pytest_twisted

from sftpauth.auth.credentials import LoginRequest
from sftpauth.auth.errors import LoginFailed
from sftpauth.auth.ldap.client import DOWN
from sftpauth.auth.ldap.method import LDAPMethod
from sftpauth.auth.trace import Trace
from sftpauth.config.loader import parse_configuration

from .conftest import DIRECTORY_LDIF
from .slapd import SlapdServer
from .tls_certs import TestPKI

pytestmark = pytest.mark.slapd

ALICE_DN = "uid=alice,ou=Engineering,ou=people,dc=example,dc=com"
MODES = ["yes", "starttls"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return TestPKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def directories(pki):
    """One TLS-enabled slapd per certificate kind, each holding the test directory."""
    started = {}
    try:
        for kind in ("good", "wrong_name", "expired", "untrusted"):
            pair = getattr(pki, kind)
            server = started[kind] = SlapdServer(tls_certificate=pair.certificate, tls_key=pair.key).start()
            server.add_ldif_file(DIRECTORY_LDIF)
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def plain_directory():
    """A slapd without TLS that logs every operation (to prove no BIND arrives in clear)."""
    with SlapdServer(debug_level="stats") as server:
        server.add_ldif_file(DIRECTORY_LDIF)
        yield server


def port_for(server: SlapdServer, mode: str) -> int:
    return server.ldaps_port if mode == "yes" else server.port


def build_method(tmp_path, host: str, port: int, mode: str, trust: str) -> LDAPMethod:
    from twisted.internet import reactor

    text = textwrap.dedent(
        f"""
        [groups/ldap-users]
        home_folder_path = {tmp_path}/homes

        [authentications/ldap]
        type = ldap
        address = {host}:{port}
        secure_connection = {mode}
        tls_trusted_certificates = {trust}
        timeout = 2
        retry_interval = 2
        bind_dn = ou=Engineering,ou=people,dc=example,dc=com
        username_attribute = uid
        base_groups = ldap-users
        """
    )
    configuration = parse_configuration(text, str(tmp_path / "sftpauth.ini"), str(tmp_path), {})
    return LDAPMethod(configuration.authentications["ldap"], configuration, reactor)


async def login(method: LDAPMethod):
    trace = Trace()
    request = LoginRequest("alice", "alice-pass", "ftp", "ftp", "192.0.2.1", trace=trace)
    try:
        return await method.authenticate(request), trace
    except LoginFailed as failure:
        return failure, trace


async def sleep(seconds: float) -> None:
    from twisted.internet import reactor, task

    await task.deferLater(reactor, seconds, lambda: None)


def steps(trace: Trace, action: str) -> list[str]:
    return [step.detail for step in trace.steps if step.action == action]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
@pytest.mark.parametrize("mode", MODES)
@pytest_twisted.ensureDeferred
async def test_login_over_tls_with_the_ca_bundle(directories, pki, tmp_path, mode, host):
    """LDAPS and StartTLS log alice in when the certificate chains to the bundle and names the host or IP address."""
    method = build_method(tmp_path, host, port_for(directories["good"], mode), mode, pki.ca_bundle)
    account, trace = await login(method)
    assert not isinstance(account, LoginFailed), trace.steps
    assert account.dn == ALICE_DN
    [connected] = steps(trace, "connect")
    kind = "LDAPS" if mode == "yes" else "StartTLS"
    assert f"({kind}, TLSv1." in connected
    assert f"certificate verified, name {host} matches" in connected


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("wrong_name", "certificate name mismatch: it is for DNS:ldap.other.example, not 127.0.0.1"),
        ("expired", "the certificate has expired on "),
        ("untrusted", "the issuer is not trusted"),
    ],
)
@pytest.mark.parametrize("mode", MODES)
@pytest_twisted.ensureDeferred
async def test_a_bad_certificate_is_refused_with_its_reason(directories, pki, tmp_path, mode, kind, reason):
    """A certificate for another name, an expired one or one from an untrusted CA fails the login as service-unavailable, saying why."""
    method = build_method(tmp_path, "127.0.0.1", port_for(directories[kind], mode), mode, pki.ca_bundle)
    failure, trace = await login(method)
    assert isinstance(failure, LoginFailed)
    assert failure.reason == "service-unavailable"
    assert f"TLS certificate refused: {reason}" in failure.explanation
    assert steps(trace, "bind") == []
    [state] = method.pool.states()
    assert state.status == DOWN and reason in state.last_error


@pytest.mark.parametrize("mode", MODES)
@pytest_twisted.ensureDeferred
async def test_the_system_store_does_not_trust_the_test_ca(directories, tmp_path, mode):
    """With the default trust (the system store) a private CA's certificate is refused."""
    method = build_method(tmp_path, "127.0.0.1", port_for(directories["good"], mode), mode, "system")
    failure, _ = await login(method)
    assert isinstance(failure, LoginFailed) and failure.reason == "service-unavailable"
    assert "the issuer is not trusted" in failure.explanation


@pytest.mark.parametrize("kind", ["wrong_name", "expired", "untrusted"])
@pytest.mark.parametrize("mode", MODES)
@pytest_twisted.ensureDeferred
async def test_disabling_identity_security_accepts_any_certificate(directories, tmp_path, mode, kind):
    """disable-identity-security logs in whatever the certificate, and the trace says it was not verified."""
    method = build_method(tmp_path, "127.0.0.1", port_for(directories[kind], mode), mode, "disable-identity-security")
    account, trace = await login(method)
    assert not isinstance(account, LoginFailed), trace.steps
    assert account.dn == ALICE_DN
    [connected] = steps(trace, "connect")
    assert "certificate NOT verified (disable-identity-security)" in connected


@pytest_twisted.ensureDeferred
async def test_a_refused_starttls_fails_and_never_falls_back_to_plain_text(plain_directory, pki, tmp_path):
    """A server without TLS refuses StartTLS: the login fails and no BIND (no password) is ever sent to it."""
    method = build_method(tmp_path, "127.0.0.1", plain_directory.port, "starttls", pki.ca_bundle)
    before = len(plain_directory.log_tail(100000).splitlines())
    failure, trace = await login(method)
    assert isinstance(failure, LoginFailed) and failure.reason == "service-unavailable"
    assert "the server refused StartTLS" in failure.explanation
    assert steps(trace, "bind") == []
    await sleep(0.2)  # let slapd log the end of the connection
    during = "\n".join(plain_directory.log_tail(100000).splitlines()[before:])
    assert "oid=1.3.6.1.4.1.1466.20037" in during  # the StartTLS request arrived
    assert "closed" in during
    assert " BIND " not in during and " SRCH " not in during


@pytest_twisted.ensureDeferred
async def test_ldaps_to_a_plain_ldap_port_fails_cleanly(plain_directory, pki, tmp_path):
    """LDAPS pointed at a plain LDAP port fails the handshake: service-unavailable, nothing sent in clear."""
    method = build_method(tmp_path, "127.0.0.1", plain_directory.port, "yes", pki.ca_bundle)
    failure, trace = await login(method)
    assert isinstance(failure, LoginFailed) and failure.reason == "service-unavailable"
    assert "TLS handshake" in failure.explanation
    assert steps(trace, "bind") == []


@pytest.mark.parametrize("mode", MODES)
@pytest_twisted.ensureDeferred
async def test_an_ipv6_address_is_checked_against_the_certificate(directories, pki, tmp_path, mode):
    """Through [::1] (a loopback forwarder to slapd) the certificate's IP:::1 entry matches; one without it is refused."""
    from twisted.internet import reactor
    from twisted.protocols.portforward import ProxyFactory

    def forwarder(kind):
        return reactor.listenTCP(0, ProxyFactory("127.0.0.1", port_for(directories[kind], mode)), interface="::1")

    good, wrong = forwarder("good"), forwarder("wrong_name")
    try:
        method = build_method(tmp_path, "[::1]", good.getHost().port, mode, pki.ca_bundle)
        account, trace = await login(method)
        assert not isinstance(account, LoginFailed), trace.steps
        [connected] = steps(trace, "connect")
        assert f"connected to [::1]:{good.getHost().port}" in connected
        assert "certificate verified, name ::1 matches" in connected

        method = build_method(tmp_path, "[::1]", wrong.getHost().port, mode, pki.ca_bundle)
        failure, _ = await login(method)
        assert isinstance(failure, LoginFailed) and failure.reason == "service-unavailable"
        assert "certificate name mismatch: it is for DNS:ldap.other.example, not ::1" in failure.explanation
    finally:
        await good.stopListening()
        await wrong.stopListening()
