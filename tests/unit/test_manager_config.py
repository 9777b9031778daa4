"""The Web Manager's configuration: [services/..] type = manager, [administrators/..], the certificate, the service."""

from __future__ import annotations

import textwrap

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
import datetime

from sftpauth.config.errors import ConfigError
from sftpauth.config.loader import parse_configuration
from sftpauth.config.models import AdministratorSettings, ManagerServiceSettings

HASH = "$argon2id$v=19$m=65536,t=3,p=4$bMGNEipUbmV6G/aKFcKDmg$rO8XEnsXcYOJM1HdARTaYBtV/tHHD3wKEgGNgggnGmU"


def load(text: str):
    return parse_configuration(textwrap.dedent(text), "/etc/sftpauth/s.ini", "/etc/sftpauth", {})


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(text)
    return [str(problem) for problem in caught.value.problems]


def test_manager_service_defaults():
    """A bare manager section gets its documented defaults."""
    configuration = load("[services/web]\ntype = manager\nport = 8443\n")
    service = configuration.services["web"]
    assert isinstance(service, ManagerServiceSettings)
    assert service.ssl_certificate == ""
    assert service.header_authentication is False
    assert service.trusted_proxies == ()
    assert service.header_authentication_role == "DEFAULT-ROLE"
    assert service.metrics_require_login is True
    assert service.session_idle_timeout == 900


def test_manager_chain_tries_local_administrators_first():
    """Without its own list a manager service tries DEFAULT-AUTHENTICATION, then the server's methods."""
    configuration = load(
        """
        [server]
        authentications = ldap, DEFAULT-AUTHENTICATION
        [authentications/ldap]
        type = ldap
        address = 127.0.0.1
        bind_dn = dc=example,dc=com
        [services/web]
        type = manager
        port = 8443
        [services/ftp]
        type = ftp
        port = 2121
        """
    )
    assert configuration.authentications_for(configuration.services["web"]) == ("DEFAULT-AUTHENTICATION", "ldap")
    assert configuration.authentications_for(configuration.services["ftp"]) == ("ldap", "DEFAULT-AUTHENTICATION")


def test_trusted_proxies_accepts_addresses_and_networks():
    """trusted_proxies takes addresses and CIDRs, IPv4 and IPv6, and matches IPv4-mapped peers."""
    configuration = load(
        """
        [services/web]
        type = manager
        port = 8443
        header_authentication = yes
        trusted_proxies =
            10.1.0.0/16
            192.0.2.7, 2001:db8::/32
        """
    )
    service = configuration.services["web"]
    assert service.is_trusted_proxy("10.1.200.3")
    assert service.is_trusted_proxy("::ffff:10.1.2.3")
    assert service.is_trusted_proxy("192.0.2.7")
    assert service.is_trusted_proxy("2001:db8::5")
    assert not service.is_trusted_proxy("192.0.2.8")
    assert not service.is_trusted_proxy("10.2.0.1")
    assert not service.is_trusted_proxy("")


def test_bad_trusted_proxy_is_an_error_with_its_line():
    """A value that is no address or network names the option, line and what is expected."""
    (problem,) = errors("[services/web]\ntype = manager\nport = 8443\ntrusted_proxies = 10.0.0.0/33\n")
    assert problem.startswith("/etc/sftpauth/s.ini:4 [services/web] trusted_proxies:") and "10.0.0.5" in problem


def test_header_authentication_is_refused_behind_the_proxy_protocol():
    """The PROXY header's claimed address would be what trusted_proxies is checked against: refused, on its line."""
    (problem,) = errors(
        "[services/web]\ntype = manager\nport = 8443\nproxy_protocol = yes\n"
        "header_authentication = yes\ntrusted_proxies = 10.0.0.1\n"
    )
    assert problem.startswith("/etc/sftpauth/s.ini:5 [services/web] header_authentication: cannot be used with proxy_protocol")


def test_header_authentication_needs_trusted_proxies():
    """header_authentication = yes without trusted_proxies is refused."""
    (problem,) = errors("[services/web]\ntype = manager\nport = 8443\nheader_authentication = yes\n")
    assert "trusted_proxies" in problem and "required" in problem


def test_header_authentication_role_must_exist():
    """header_authentication_role must name a [roles/ID]."""
    (problem,) = errors("[services/web]\ntype = manager\nport = 8443\nheader_authentication_role = nobody\n")
    assert "unknown role 'nobody'" in problem


def test_open_metrics_are_a_warning():
    """metrics_require_login = no loads with a warning naming the option."""
    configuration = load("[services/web]\ntype = manager\nport = 8443\nmetrics_require_login = no\n")
    assert any(warning.option == "metrics_require_login" for warning in configuration.warnings)


def test_administrators_section():
    """[administrators/ID]: name, enabled, password hash and roles (default DEFAULT-ROLE)."""
    configuration = load(
        f"""
        [roles/auditors]
        permissions = configuration, read
        [administrators/root]
        password = {HASH}
        [administrators/ann]
        name = Ann
        enabled = no
        password = {HASH}
        roles = auditors, DEFAULT-ROLE
        """
    )
    root, ann = configuration.administrators["root"], configuration.administrators["ann"]
    assert isinstance(root, AdministratorSettings)
    assert (root.username, root.enabled, root.roles) == ("root", True, ("DEFAULT-ROLE",))
    assert (ann.username, ann.enabled, ann.roles) == ("Ann", False, ("auditors", "DEFAULT-ROLE"))
    assert HASH not in repr(root)


def test_administrator_errors():
    """Unknown roles, clear-text passwords, duplicate names and unknown options are errors."""
    problems = errors(
        f"""
        [administrators/a]
        password = secret
        roles = ghosts
        [administrators/b]
        name = a
        password = {HASH}
        colour = red
        """
    )
    text = "\n".join(problems)
    assert "unknown role 'ghosts'" in text
    assert "not a password hash" in text
    assert "also used by [administrators/a]" in text
    assert "unknown option" in text and "colour" in text
    assert "secret" not in text.replace("secrets", "")


def test_administrators_without_a_local_method_warn():
    """A manager whose own chain lacks DEFAULT-AUTHENTICATION warns that administrators cannot log in."""
    configuration = load(
        f"""
        [authentications/ldap]
        type = ldap
        address = 127.0.0.1
        bind_dn = dc=example,dc=com
        [services/web]
        type = manager
        port = 8443
        authentications = ldap
        [administrators/root]
        password = {HASH}
        """
    )
    assert any("cannot log into this Web Manager" in str(warning) for warning in configuration.warnings)


# -- the certificate ------------------------------------------------------------------


def _settings(tmp_path, certificate: str = ""):
    return load(f"[services/web]\ntype = manager\nport = 8443\nssl_certificate = {certificate}\n").services["web"]


def test_self_signed_certificate_is_generated_once(tmp_path):
    """Without ssl_certificate a self-signed certificate is made once, 0600, with a stable fingerprint."""
    from sftpauth.manager.tls import load_certificate

    settings = _settings(tmp_path)
    first = load_certificate(settings, "/x.ini", str(tmp_path / "data"))
    second = load_certificate(settings, "/x.ini", str(tmp_path / "data"))
    assert first.generated and first.fingerprint == second.fingerprint
    assert len(first.fingerprint.split(":")) == 32
    path = tmp_path / "data" / "manager" / "certificate.pem"
    assert path.stat().st_mode & 0o777 == 0o600
    certificate = x509.load_pem_x509_certificate(path.read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert [str(address) for address in names.get_values_for_type(x509.IPAddress)][:1] == ["127.0.0.1"]


def _write_pem(path, key, certificate, with_key: bool = True):
    data = certificate.public_bytes(serialization.Encoding.PEM)
    if with_key:
        data += key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_bytes(data)


def _certificate(key):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "manager.example.com")])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def test_configured_certificate_is_used(tmp_path):
    """ssl_certificate with certificate and key is loaded as given."""
    from sftpauth.manager.tls import load_certificate

    key = ec.generate_private_key(ec.SECP256R1())
    _write_pem(tmp_path / "web.pem", key, _certificate(key))
    loaded = load_certificate(_settings(tmp_path, str(tmp_path / "web.pem")), "/x.ini", str(tmp_path / "data"))
    assert not loaded.generated
    assert "manager.example.com" in loaded.subject


@pytest.mark.parametrize("problem", ["no-key", "wrong-key", "missing"])
def test_bad_certificate_file_is_a_config_error(tmp_path, problem):
    """A missing file, a file without its key or with another key is a ConfigError naming ssl_certificate."""
    from sftpauth.manager.tls import load_certificate

    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "web.pem"
    if problem == "no-key":
        _write_pem(path, key, _certificate(key), with_key=False)
    elif problem == "wrong-key":
        _write_pem(path, ec.generate_private_key(ec.SECP256R1()), _certificate(key))
    with pytest.raises(ConfigError) as caught:
        load_certificate(_settings(tmp_path, str(path)), "/x.ini", str(tmp_path / "data"))
    assert caught.value.problems[0].option == "ssl_certificate"


def test_manager_service_is_wired_into_twistd(tmp_path, make_hash):
    """type = manager has a service factory; the service listens and reports the states of its siblings."""
    from twisted.application.service import MultiService

    from manager_harness import ManagerHarness
    from sftpauth.tap import service_factories

    harness = ManagerHarness(tmp_path, make_hash)
    try:
        top = MultiService()
        service = service_factories()["manager"](harness.settings, harness.runtime)
        service.setServiceParent(top)
        top.startService()
        assert [port[0] for port in harness.clock.tcpServers] == [10443]
        assert service.service_states() == {"manager": "running"}
        top.stopService()
        assert service.service_states() == {"manager": "stopped"}
    finally:
        harness.close()
