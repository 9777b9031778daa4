"""Password hashes for [accounts/..] and [administrators/..].

New hashes are argon2id. Hashes made elsewhere verify too: bcrypt
(``$2b$``), and SHA-crypt (``$5$``, ``$6$``, the Modular Crypt Format that
SFTPPlus's ``admin-commands generate-password`` writes, ``$5$rounds=80000$``),
so an SFTPPlus file's accounts and administrators log in unchanged. Hashing
is slow by design, so callers run :func:`verify_password` in a thread (see
:class:`sftpauth.auth.application.ApplicationMethod`).
"""

from __future__ import annotations

import argon2
import bcrypt
from passlib.hash import sha256_crypt, sha512_crypt  # libpass, the maintained passlib

_ARGON2 = argon2.PasswordHasher()
_SHA_CRYPT = {"$5$": sha256_crypt, "$6$": sha512_crypt}


def hash_password(password: str) -> str:
    return _ARGON2.hash(password)


def is_supported_hash(value: str) -> bool:
    if value.startswith("$argon2"):
        try:
            argon2.extract_parameters(value)
        except argon2.exceptions.InvalidHashError:
            return False
        return True
    scheme = _SHA_CRYPT.get(value[:3])
    if scheme is not None:
        try:
            return scheme.from_string(value).checksum is not None  # a salt alone is a setting, not a hash
        except ValueError:
            return False
    return value.startswith(("$2a$", "$2b$", "$2y$")) and len(value) == 60


def verify_password(stored_hash: str, password: str) -> bool:
    """True when ``password`` matches; never raises for a wrong password."""
    if stored_hash.startswith("$argon2"):
        try:
            return _ARGON2.verify(stored_hash, password)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False
    if stored_hash.startswith(("$2a$", "$2b$", "$2y$")):
        try:
            return bcrypt.checkpw(password.encode("utf-8"), stored_hash.encode("ascii"))
        except ValueError:
            return False
    scheme = _SHA_CRYPT.get(stored_hash[:3])
    if scheme is not None and is_supported_hash(stored_hash):
        try:
            return scheme.verify(password.encode("utf-8", "surrogatepass"), stored_hash)
        except ValueError:
            return False
    return False
