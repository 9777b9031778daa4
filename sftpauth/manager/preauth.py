"""Header pre-authentication (geOrchestra style), from trusted reverse proxies only.

A proxy that already authenticated the user (SSO, CAS, OIDC...) sends
``preauth-username`` and optionally ``preauth-email``,
``preauth-firstname``, ``preauth-lastname`` and ``preauth-provider``. A
value starting with ``{base64}`` is base64 of UTF-8 text (for names with
non-ASCII letters); any other value must be UTF-8 text itself.

These headers are honoured only with ``header_authentication = yes`` and
from an address of ``trusted_proxies``: from anywhere else they are
ignored and the attempt is audited, so a client that talks to the manager
directly cannot log in by sending them.
"""

from __future__ import annotations

import base64
import binascii
from typing import Optional

import attrs

from sftpauth.auth.credentials import has_control_characters

USERNAME = b"preauth-username"
HEADERS = (USERNAME, b"preauth-email", b"preauth-firstname", b"preauth-lastname", b"preauth-provider")
BASE64_PREFIX = b"{base64}"
MAX_VALUE = 256


class InvalidPreAuthentication(ValueError):
    """A header that cannot be used: bad base64, not UTF-8, control characters, too long."""


@attrs.frozen
class PreAuthentication:
    username: str
    email: str = ""
    first_name: str = ""
    last_name: str = ""
    provider: str = ""

    @property
    def full_name(self) -> str:
        return " ".join(part for part in (self.first_name, self.last_name) if part)


def present(request) -> bool:
    """Whether the request carries any pre-authentication header."""
    return any(request.requestHeaders.hasHeader(name) for name in HEADERS)


def decode_value(raw: bytes, name: str, username: bool = False) -> str:
    """One header value as text; ``{base64}`` values are decoded as UTF-8.

    A username must also be printable: no invisible format characters
    (U+200B, U+00AD, U+202E...), line or paragraph separators, which would
    let ``r<U+200B>oot`` past a ``root`` rule and show as root on the pages.
    """
    raw = raw.strip()
    if raw[: len(BASE64_PREFIX)].lower() == BASE64_PREFIX:
        try:
            raw = base64.b64decode(raw[len(BASE64_PREFIX):], validate=True)
        except (binascii.Error, ValueError):
            raise InvalidPreAuthentication(f"{name}: the {{base64}} value is not valid base64") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidPreAuthentication(f"{name}: the value is not UTF-8 text") from None
    text = text.strip()
    if len(text) > MAX_VALUE:
        raise InvalidPreAuthentication(f"{name}: the value is {len(text)} characters long (at most {MAX_VALUE})")
    if has_control_characters(text):
        raise InvalidPreAuthentication(f"{name}: the value contains control characters")
    if username and not text.replace(" ", "").isprintable():
        odd = next(char for char in text if char != " " and not char.isprintable())
        raise InvalidPreAuthentication(f"{name}: the value contains an invisible character (U+{ord(odd):04X})")
    return text


def read(request) -> Optional[PreAuthentication]:
    """The pre-authentication the headers claim; None when there is no ``preauth-username``."""
    values = {}
    for name in HEADERS:
        raw = request.requestHeaders.getRawHeaders(name)
        if raw and len(raw) > 1:
            # A proxy that adds its header instead of replacing the client's would let the client's win.
            raise InvalidPreAuthentication(f"{name.decode('ascii')}: sent {len(raw)} times (at most once)")
        values[name] = decode_value(raw[0], name.decode("ascii"), username=name == USERNAME) if raw else ""
    if not values[USERNAME]:
        return None
    return PreAuthentication(
        username=values[USERNAME],
        email=values[b"preauth-email"],
        first_name=values[b"preauth-firstname"],
        last_name=values[b"preauth-lastname"],
        provider=values[b"preauth-provider"],
    )


def claimed_username(request) -> str:
    """The username an ignored attempt claimed, for the audit log (best effort, never raises)."""
    raw = request.requestHeaders.getRawHeaders(USERNAME)
    if not raw:
        return ""
    try:
        return decode_value(raw[0], "preauth-username")
    except InvalidPreAuthentication:
        return raw[0][:MAX_VALUE].decode("utf-8", "backslashreplace")
