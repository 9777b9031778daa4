"""Prove that the ``slapd`` fixture runs a real, correctly loaded OpenLDAP."""

from pathlib import Path

import pytest

pytestmark = pytest.mark.slapd

ALICE_DN = "uid=alice,ou=Engineering,ou=people,dc=example,dc=com"
JMULLER_DN_ESCAPED_HEX = (
    r"cn=M\C3\BCller\2C J\C3\BCrgen,ou=Engineering,ou=people,dc=example,dc=com")
JMULLER_DN_ESCAPED_UTF8 = (
    r"cn=Müller\, Jürgen,ou=Engineering,ou=people,dc=example,dc=com")
FTP_USERS_DN = "cn=ftp-users,ou=groups,dc=example,dc=com"


def test_root_dse_and_base_answer(slapd):
    """The server answers anonymously on its ldap://127.0.0.1:PORT URL and serves the base DN."""
    assert slapd.url == f"ldap://127.0.0.1:{slapd.port}"
    root_dse = slapd.search("", scope="base", attrs=["namingContexts"], bind_dn="")
    assert root_dse[0][1]["namingContexts"] == ["dc=example,dc=com"]
    base = slapd.search(slapd.base_dn, scope="base", bind_dn="")
    assert [dn for dn, _ in base] == ["dc=example,dc=com"]


def test_alice_binds_with_her_password(slapd):
    """alice can simple-bind with her DN and password "alice-pass"."""
    result = slapd.ldapwhoami(ALICE_DN, "alice-pass")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"dn:{ALICE_DN}".encode()


def test_wrong_password_is_invalid_credentials(slapd):
    """A bind with a wrong password fails with invalidCredentials (exit 49)."""
    result = slapd.ldapwhoami(ALICE_DN, "not-alice-pass")
    assert result.returncode == 49
    assert b"Invalid credentials" in result.stderr


def test_alice_has_memberof_ftp_users(slapd):
    """The memberof overlay gives alice memberOf for cn=ftp-users (and cn=admins)."""
    [(dn, attrs)] = slapd.search(slapd.base_dn, "(uid=alice)", ["memberOf"])
    assert dn == ALICE_DN
    assert FTP_USERS_DN in attrs["memberOf"]
    assert "cn=admins,ou=groups,dc=example,dc=com" in attrs["memberof"]


def test_user_can_read_directory_but_not_passwords(slapd):
    """A bound user sees other entries and the dashed ftp-Home-Dir attribute but not userPassword."""
    entries = slapd.search(slapd.base_dn, "(uid=alice)", ["*"],
                           bind_dn="uid=carol,ou=contractors,dc=example,dc=com",
                           password="carol-pass")
    [(_, attrs)] = entries
    assert attrs["ftp-Home-Dir"] == ["alice-home"]
    assert "userPassword" not in attrs


@pytest.mark.parametrize("dn", [JMULLER_DN_ESCAPED_HEX, JMULLER_DN_ESCAPED_UTF8])
def test_comma_non_ascii_dn_binds_with_utf8_password(slapd, dn):
    """The "Müller, Jürgen" user binds with an escaped DN and the UTF-8 password "jürgen-päss"."""
    result = slapd.ldapwhoami(dn, "jürgen-päss")
    assert result.returncode == 0, result.stderr
    assert slapd.ldapwhoami(dn, "jurgen-pass").returncode == 49


def test_test_data_loaded(slapd):
    """The LDIF loaded: uid=dup is ambiguous under ou=people, carol is under ou=contractors with two ftpHomeMulti values."""
    dups = slapd.search("ou=people,dc=example,dc=com", "(uid=dup)", ["uid"])
    assert len(dups) == 2
    [(dn, carol)] = slapd.search(slapd.base_dn, "(uid=carol)")
    assert dn == "uid=carol,ou=contractors,dc=example,dc=com"
    assert sorted(carol["ftpHomeMulti"]) == ["/srv/ftp/carol/one", "/srv/ftp/carol/two"]
    [(_, bob)] = slapd.search(slapd.base_dn, "(uid=bob)")
    assert "homeDirectory" not in bob


def test_data_dir_is_private_temp_dir(slapd):
    """The fixture's config and database live in a temporary folder, never under /etc/ldap."""
    for path in (slapd.tmpdir, slapd.data_dir, slapd.conf_path):
        resolved = Path(path).resolve()
        assert resolved.exists()
        assert not resolved.is_relative_to("/etc/ldap")
    assert slapd.data_dir.resolve().is_relative_to(slapd.tmpdir.resolve())
    assert "/etc/ldap/slapd.d" not in slapd.conf_path.read_text()
