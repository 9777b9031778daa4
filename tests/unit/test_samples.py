"""The shipped configurations load, and the sample documents every option."""

import re
from pathlib import Path

import pytest
from configobj import ConfigObj

from sftpauth.config.loader import SPEC_PATH, load_configuration

ROOT = Path(__file__).resolve().parents[2]


def test_demo_configuration_is_valid():
    """etc/demo/sftpauth.ini loads without errors or warnings."""
    configuration = load_configuration(str(ROOT / "etc/demo/sftpauth.ini"))
    assert configuration.warnings == ()
    assert {s.type for s in configuration.services.values()} >= {"ftp", "ssh", "ldap-directory"}


def test_sample_configuration_is_valid(monkeypatch):
    """etc/sftpauth.ini loads (its secret comes from the environment)."""
    monkeypatch.setenv("SFTPAUTH_LDAP_PASSWORD", "not-a-real-secret")
    configuration = load_configuration(str(ROOT / "etc/sftpauth.ini"))
    assert "DIRECTORY" in configuration.authentications


def test_sample_configuration_checks_without_its_secret_set(monkeypatch, capsys):
    """The sample's header says to run check-config on it: its only secret is in a disabled method, so that is a warning."""
    from sftpauth.cli import main

    monkeypatch.delenv("SFTPAUTH_LDAP_PASSWORD", raising=False)
    assert main(["check-config", str(ROOT / "etc/sftpauth.ini")]) == 0
    configuration = load_configuration(str(ROOT / "etc/sftpauth.ini"))
    assert [(w.section, w.option) for w in configuration.warnings] == [
        ("authentications/DIRECTORY", "service_account_password")]
    assert "SFTPAUTH_LDAP_PASSWORD" in configuration.warnings[0].message


def _spec_options():
    spec = ConfigObj(SPEC_PATH, list_values=False, interpolation=False, _inspec=True)
    for section, options in spec.items():
        for option, check in options.items():
            if not check.startswith(("unsupported", "refused")):  # SFTPPlus's, not sftpauth's: the header names them
                yield section, option


@pytest.mark.parametrize("section, option", sorted(set(_spec_options())))
def test_sample_documents_every_option(section, option):
    """Every option of the configspec appears in etc/sftpauth.ini."""
    sample = (ROOT / "etc/sftpauth.ini").read_text(encoding="utf-8")
    if section == "services:ldap-directory":
        sample = (ROOT / "etc/demo/sftpauth.ini").read_text(encoding="utf-8")
    assert re.search(rf"^\s*[#;]?\s*{re.escape(option)}\s*=", sample, re.MULTILINE), f"{option} of [{section}]"
