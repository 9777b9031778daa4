"""Fixtures for integration tests against a real OpenLDAP slapd.

``slapd`` (session scope) is a running :class:`.slapd.SlapdServer` loaded
with ``data/directory.ldif`` (users and passwords are listed at the top of
that file).  If slapd or the OpenLDAP client tools are missing the fixture
skips, unless ``SFTPAUTH_REQUIRE_INTEGRATION=1`` is set, in which case it
fails.

``samba_dc`` (session scope) is a running Samba AD domain controller
(:class:`.samba.SambaDC`) with ``data/active-directory.ldif``; it skips or
fails the same way when Samba, iproute2 or root rights are missing.
"""

import os

import pytest

from .samba import SambaDC, SambaNotFound, provisioned_template
from .slapd import DATA_DIR, SlapdNotFound, SlapdServer

DIRECTORY_LDIF = DATA_DIR / "directory.ldif"


def pytest_configure(config):
    config.addinivalue_line("markers", "slapd: needs a real OpenLDAP slapd")
    config.addinivalue_line("markers", "samba: needs a real Samba AD domain controller")


def _integration_required() -> bool:
    return os.environ.get("SFTPAUTH_REQUIRE_INTEGRATION") == "1"


@pytest.fixture(scope="session")
def slapd():
    """A running throw-away slapd with data/directory.ldif loaded."""
    server = SlapdServer()
    try:
        server.start()
    except SlapdNotFound as exc:
        if _integration_required():
            pytest.fail(
                f"SFTPAUTH_REQUIRE_INTEGRATION=1 but slapd cannot be used: {exc}",
                pytrace=False)
        pytest.skip(f"real OpenLDAP slapd not available: {exc}")
    try:
        server.add_ldif_file(DIRECTORY_LDIF)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def samba_dc():
    """A running throw-away Samba AD DC (provisioned once, the template cached) with data/active-directory.ldif."""
    try:
        server = SambaDC(provisioned_template())
    except SambaNotFound as exc:
        if _integration_required():
            pytest.fail(f"SFTPAUTH_REQUIRE_INTEGRATION=1 but Samba AD cannot be used: {exc}", pytrace=False)
        pytest.skip(f"Samba AD domain controller not available: {exc}")
    with server:
        yield server


def pytest_collection_modifyitems(config, items):
    """Everything under tests/integration drives real servers: mark it."""
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.integration)
