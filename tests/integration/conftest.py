"""Fixtures for integration tests against a real OpenLDAP slapd.

``slapd`` (session scope) is a running :class:`.slapd.SlapdServer` loaded
with ``data/directory.ldif`` (users and passwords are listed at the top of
that file).  If slapd or the OpenLDAP client tools are missing the fixture
skips, unless ``SFTPAUTH_REQUIRE_INTEGRATION=1`` is set, in which case it
fails.
"""

import os

import pytest

from .slapd import DATA_DIR, INSTALL_HINT, SlapdNotFound, SlapdServer

DIRECTORY_LDIF = DATA_DIR / "directory.ldif"


def pytest_configure(config):
    config.addinivalue_line("markers", "slapd: needs a real OpenLDAP slapd")


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


def pytest_collection_modifyitems(config, items):
    """Everything under tests/integration drives real servers: mark it."""
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.integration)
