"""CSRF tokens: one per session, compared in constant time on every POST.

Forms carry the token in a hidden ``csrf_token`` field, API clients in an
``X-CSRF-Token`` header. Before login there is no session, so the login
form uses a double-submit token: a random value in a short-lived cookie
that the form must repeat. The cookies are also ``SameSite=Strict``.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Optional

FORM_FIELD = "csrf_token"
HEADER = b"x-csrf-token"


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_matches(expected: Optional[str], given: Optional[str]) -> bool:
    """True only for two equal, non-empty tokens (no timing leak)."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode("utf-8", "replace"), given.encode("utf-8", "replace"))
