"""Password hashes for [accounts/..] and [administrators/..].

New hashes are argon2id; bcrypt hashes (``$2b$``) made elsewhere verify too.
Hashing is slow by design, so callers run :func:`verify_password` in a
thread (see :class:`sftpauth.auth.application.ApplicationMethod`).
"""

from __future__ import annotations

import argon2
import bcrypt

_ARGON2 = argon2.PasswordHasher()


def hash_password(password: str) -> str:
    return _ARGON2.hash(password)


def is_supported_hash(value: str) -> bool:
    if value.startswith("$argon2"):
        try:
            argon2.extract_parameters(value)
        except argon2.exceptions.InvalidHashError:
            return False
        return True
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
    return False
