"""Password hashes of [accounts/..] and [administrators/..]: ours, and those other servers wrote."""

from __future__ import annotations

import pytest

from sftpauth.auth.passwords import hash_password, is_supported_hash, verify_password
from sftpauth.config.errors import ConfigError
from sftpauth.config.loader import parse_configuration

# Made by glibc's libxcrypt (Python's crypt module), not by the library sftpauth verifies them with.
SHA256_CRYPT = "$5$rounds=80000$RZ48ALAHbUEdKWmi$rhcJ4PXdCq6sdQaEc7vE8xjYcXEbLxbTZFaQKOkX/7C"  # SFTPPlus's form
SHA256_CRYPT_DEFAULT_ROUNDS = "$5$shortsalt$2Szeg.1PwpxgHTs8CDQ9ki4hevfwTkEqTurY6kw4vG/"
SHA512_CRYPT = (
    "$6$rounds=5000$saltsaltsalt$/KaswdFGkn2DcoYU/9jy1ixeA6S7zAibEJaamJVC418zXOeUdteGBo.FkcgPGLoYnoxq6uiboU3X6Wqi9dtM21"
)


@pytest.mark.parametrize("stored", [SHA256_CRYPT, SHA256_CRYPT_DEFAULT_ROUNDS, SHA512_CRYPT])
def test_sha_crypt_hashes_verify(stored):
    assert is_supported_hash(stored)
    assert verify_password(stored, "SFTPPlus-pass")
    assert not verify_password(stored, "SFTPPlus-pass ")
    assert not verify_password(stored, "")


@pytest.mark.parametrize("stored", ["$5$rounds=80000$salt", "$6$", "$5$rounds=1$salt$" + "x" * 43, "$1$salt$abc"])
def test_a_broken_or_unknown_crypt_string_is_not_a_hash(stored):
    assert not is_supported_hash(stored)
    assert not verify_password(stored, "SFTPPlus-pass")


def test_argon2id_is_still_what_hash_password_makes():
    assert hash_password("x").startswith("$argon2id$")


def test_an_sftpplus_account_and_administrator_load_with_their_hashes():
    configuration = parse_configuration(
        f"[accounts/alice]\npassword = {SHA256_CRYPT}\n[administrators/admin]\npassword = {SHA512_CRYPT}\n", "/x.ini", "/", {}
    )
    assert configuration.accounts["alice"].password == SHA256_CRYPT
    with pytest.raises(ConfigError) as refused:
        parse_configuration("[accounts/alice]\npassword = $1$salt$abc\n", "/x.ini", "/", {})
    assert "SHA-crypt $5$/$6$" in str(refused.value) and "sftpauth hash-password" in str(refused.value)
