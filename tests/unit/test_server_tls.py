"""Server TLS for FTPS (sftpauth.tls, ftp.load_tls): certificate files, contexts, SIGHUP reload."""

from __future__ import annotations

import datetime
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet import task
from twisted.logger import LogLevel, formatEvent

from sftpauth import ftp
from sftpauth.config.errors import ConfigError
from sftpauth.config.models import FTPServiceSettings
from sftpauth.tls import CertificateProblem, DailyDateCheck, ServerTLS, can_check_session_reuse, load_server_certificate
from log_capture import captured_logs
from tests.integration.tls_certs import TestPKI


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> TestPKI:
    return TestPKI(tmp_path_factory.mktemp("pki"))


def combined(tmp_path: Path, *parts: Path, name: str = "server.pem") -> str:
    path = tmp_path / name
    path.write_bytes(b"".join(part.read_bytes() for part in parts))
    return str(path)


def test_certificate_and_key_in_one_file_load(pki, tmp_path):
    """A PEM file with the certificate then its key loads, with subject and SHA256 fingerprint."""
    loaded = load_server_certificate(combined(tmp_path, pki.good.certificate, pki.good.key))
    assert "CN=localhost" in loaded.subject
    assert len(loaded.fingerprint.split(":")) == 32
    assert loaded.chain == ()


def test_key_first_and_chain_certificates_are_accepted(pki, tmp_path):
    """The key may come first; other certificates in the file become the chain sent after the leaf."""
    loaded = load_server_certificate(combined(tmp_path, pki.good.key, pki.ca_bundle, pki.good.certificate))
    assert "CN=localhost" in loaded.subject
    assert [certificate.subject.rfc4514_string() for certificate in loaded.chain] == ["CN=sftpauth test CA,O=sftpauth tests"]


@pytest.mark.parametrize(
    "parts, message",
    [
        ((), "cannot read"),
        (("garbage",), "no PEM certificate"),
        (("good.certificate",), "no usable PEM private key"),
        (("good.certificate", "wrong_name.key"), "does not belong to any certificate"),
        (("expired.certificate", "expired.key"), "expired on"),
    ],
)
def test_unusable_files_say_why(pki, tmp_path, parts, message):
    """Missing files, files without a certificate or key, a foreign key and an expired certificate are refused with a reason."""
    if not parts:
        path = str(tmp_path / "absent.pem")
    else:
        files = []
        for part in parts:
            if part == "garbage":
                garbage = tmp_path / "garbage"
                garbage.write_text("hello\n")
                files.append(garbage)
            else:
                pair, kind = part.split(".")
                files.append(getattr(getattr(pki, pair), kind))
        path = combined(tmp_path, *files)
    with pytest.raises(CertificateProblem, match=message):
        load_server_certificate(path)


def test_an_encrypted_key_is_refused(pki, tmp_path):
    """A key protected by a passphrase is refused with a sentence saying so."""
    key = serialization.load_pem_private_key(pki.good.key.read_bytes(), None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    )
    path = tmp_path / "encrypted.pem"
    path.write_bytes(pki.good.certificate.read_bytes() + encrypted)
    with pytest.raises(CertificateProblem, match="passphrase"):
        load_server_certificate(str(path))


def test_each_session_has_its_own_context_with_tls_1_2_or_later(pki, tmp_path):
    """new_session() gives a fresh context each time (own session cache and ticket keys), refusing TLS 1.0 and 1.1."""
    tls = ServerTLS(combined(tmp_path, pki.good.certificate, pki.good.key), "ftps")
    first, second = tls.new_session().getContext(), tls.new_session().getContext()
    assert first is not second
    options = first.set_options(0)
    assert options & SSL.OP_NO_TLSv1 and options & SSL.OP_NO_TLSv1_1
    assert first.get_session_cache_mode() & SSL.SESS_CACHE_SERVER
    assert can_check_session_reuse()


def test_reload_takes_a_new_file_and_keeps_the_old_on_error(pki, tmp_path):
    """reload() switches to a new certificate; a broken file keeps the one in use."""
    path = combined(tmp_path, pki.good.certificate, pki.good.key)
    tls = ServerTLS(path, "ftps")
    old = tls.certificate
    combined(tmp_path, pki.wrong_name.certificate, pki.wrong_name.key)
    assert tls.reload()
    assert tls.certificate.fingerprint != old.fingerprint
    current = tls.certificate
    Path(path).write_text("broken\n")
    assert not tls.reload()
    assert tls.certificate is current


def settings(**options) -> FTPServiceSettings:
    values = dict(
        id="secure", type="ftp", enabled=True, name="", address="127.0.0.1", port=0, authentications=(),
        security_policy="DEFAULT-SECURITY-POLICY", idle_connection_timeout=300,
        maximum_concurrent_connections=10, banner="hi", passive_port_range=None, passive_address="",
    )
    values.update(options)
    return FTPServiceSettings(**values)


def test_load_tls_errors_name_file_section_and_option(pki, tmp_path):
    """A bad ssl_certificate, or ftpsi without one, is a ConfigError naming the file, section and option."""
    with pytest.raises(ConfigError) as missing:
        ftp.load_tls(settings(ssl_certificate=str(tmp_path / "absent.pem")), "/etc/sftpauth.ini")
    assert str(missing.value).startswith("/etc/sftpauth.ini [services/secure] ssl_certificate: cannot read")
    with pytest.raises(ConfigError) as implicit:
        ftp.load_tls(settings(type="ftpsi"), "/etc/sftpauth.ini")
    assert "[services/secure] ssl_certificate: required for type = ftpsi" in str(implicit.value)
    assert ftp.load_tls(settings(), "/etc/sftpauth.ini") is None
    loaded = ftp.load_tls(settings(ssl_certificate=combined(tmp_path, pki.good.certificate, pki.good.key)), "x.ini")
    assert loaded.maximum_version == ftp.FTPS_MAXIMUM_VERSION


def test_ftpsi_and_the_ftps_options_load_with_their_defaults(tmp_path):
    """type = ftpsi loads as an FTP service with implicit TLS; the ftps_* and keyboard-interactive defaults are as documented."""
    from sftpauth.config.loader import parse_configuration

    text = """
[services/implicit]
type = ftpsi
port = 990
ssl_certificate = ftp.pem

[services/explicit]
type = ftp
port = 21
ftps_require_session_reuse = no

[services/sftp]
type = ssh
port = 22
"""
    configuration = parse_configuration(text, str(tmp_path / "sftpauth.ini"), str(tmp_path), {})
    implicit, explicit = configuration.services["implicit"], configuration.services["explicit"]
    assert isinstance(implicit, FTPServiceSettings) and implicit.implicit_tls and not explicit.implicit_tls
    assert implicit.ssl_certificate == str(tmp_path / "ftp.pem")
    assert explicit.ssl_certificate == ""
    assert (explicit.ftps_explicit_enabled, explicit.ftps_force_secured_command_channel) == (True, True)
    assert (explicit.ftps_force_secured_data_channel, explicit.ftps_require_session_reuse) == (True, False)
    assert configuration.services["sftp"].keyboard_interactive_message == "Password:"


DAY = datetime.timedelta(days=1)


@pytest.mark.parametrize(
    "start, end, wanted",
    [
        (-DAY, 20 * DAY, ""),
        (-DAY, 5 * DAY + datetime.timedelta(hours=1), "expires on .* UTC, in 5 days$"),
        (-DAY, datetime.timedelta(hours=3), "expires on .* UTC, in less than a day$"),
        (3 * DAY, 90 * DAY, "is not valid before .* UTC: clients refuse it until then"),
        (-30 * DAY, -DAY, "expired on .* UTC: clients refuse it$"),
    ],
    ids=["fine", "expiring", "last-day", "not-yet-valid", "expired"],
)
def test_date_problem_says_when_clients_refuse_the_certificate(pki, tmp_path, start, end, wanted):
    """Not valid yet, expired and expiring within two weeks are problems; a certificate good for 20 days is not."""
    pair = pki.dated(f"dated-{wanted[:8]}", pki.now + start, pki.now + end)
    loaded = load_server_certificate(combined(tmp_path, pair.certificate, pair.key), check_expiry=False)
    problem = loaded.date_problem(pki.now)
    if wanted:
        assert re.search(wanted, problem) and loaded.path in problem
    else:
        assert problem == ""


def test_a_truncated_or_damaged_certificate_is_called_so(pki, tmp_path):
    """A certificate cut short (a bad copy and paste) is not reported as "no PEM certificate"."""
    text = pki.good.certificate.read_bytes()
    for damaged in (text[: len(text) // 2], text.replace(b"-----END CERTIFICATE-----", b"")):
        path = tmp_path / "cut.pem"
        path.write_bytes(damaged + pki.good.key.read_bytes())
        with pytest.raises(CertificateProblem, match="cannot be read: it is cut short or damaged"):
            load_server_certificate(str(path))


def test_a_reload_and_the_daily_check_log_a_certificate_about_to_expire(pki, tmp_path):
    """SIGHUP's reload warns of a new certificate expiring soon; the daily check says so too, an error once expired."""
    path = combined(tmp_path, pki.good.certificate, pki.good.key)
    tls = ServerTLS(path, "ftps")
    soon = pki.dated("soon", pki.now - DAY, pki.now + 3 * DAY + datetime.timedelta(hours=1))
    combined(tmp_path, soon.certificate, soon.key)
    with captured_logs() as events:
        assert tls.reload()
    warnings = [formatEvent(event) for event in events if event["log_level"] == LogLevel.warn]
    assert len(warnings) == 1 and "expires on" in warnings[0] and "in 3 days" in warnings[0]
    assert "service ftps:" in warnings[0] and "send SIGHUP" in warnings[0]

    clock = task.Clock()
    check = DailyDateCheck(clock, tls.check_dates)
    with captured_logs() as events:
        check.startService()
        assert events == []  # start-up reports dates as configuration warnings, not here
        clock.advance(DailyDateCheck.INTERVAL)
        clock.advance(DailyDateCheck.INTERVAL)
    assert [event["log_level"] for event in events] == [LogLevel.warn, LogLevel.warn]
    with captured_logs() as events:
        assert "expired on" in tls.check_dates(now=pki.now + 4 * DAY)
    assert [event["log_level"] for event in events] == [LogLevel.error]
    check.stopService()
    assert clock.getDelayedCalls() == []


def test_a_daily_check_that_raises_is_logged_not_left_unhandled():
    """A bug in the check stops the loop with a logged failure (no "Unhandled error in Deferred")."""
    clock = task.Clock()

    def broken():
        raise RuntimeError("bug")

    check = DailyDateCheck(clock, broken)
    with captured_logs() as events:
        check.startService()
        clock.advance(DailyDateCheck.INTERVAL)
    (event,) = [event for event in events if "log_failure" in event]
    assert event["log_failure"].check(RuntimeError) and "daily certificate date check" in formatEvent(event)
    assert clock.getDelayedCalls() == []
    check.stopService()
