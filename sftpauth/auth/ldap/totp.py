"""TOTP appended to the password: ``python:sftpauth.ldap.totp.AugmentedTOTP``.

The user types password and code as one string (``SecretPass123456``). The
last N characters are the code; the rest is the password sent to the BIND.
Only after the BIND succeeded is the code checked against the otpauth URI in
``mfa_attribute`` (RFC 6238 with the URI's algorithm, digits and period, one
step of drift each way), so a wrong password and a wrong code take the same
path up to the BIND and nobody learns which factor was wrong.

N is the URI's ``digits`` (SPEC: "N from the URI, default 6"). The split must
happen before the BIND, so the URI is read before it where that is possible:
``bind_dn_type = search`` finds the entry, secret included, with the service
account; ``parent``, ``relative`` and ``absolute`` read the candidate DN as
the service account just before its BIND (only when a service account is
configured). Otherwise (``direct-username``, or no service account) the
default 6 is used: a URI that asks for another number rejects the login
(``totp-invalid-secret``), or the BIND is refused because it got part of a
longer code, and then ``invalid-password``'s detail says the length was not
read (``credentials.bind_password_note``). ``"digits": N`` in
``extension_configuration`` fixes N for every account and skips the early
read.

A code that let somebody in is claimed in the shared replay store, keyed on
the entry's DN, time step and code, until it can no longer be valid; a second
login with it, on any service and through any authentication method, is
``totp-replayed``. The key holds no method ID: two methods on one directory
(FTP and SFTP may use different ones) find the same entry, so a code let in
by one is refused by the other. Nor anything derived from the secret: the
store may be a Redis server that others can read.

Wrong codes that come with the right password are counted per account (entry
DN), in the ban store: ``lock_after_wrong_codes`` of them in a row refuse the
account's logins for ``lock_seconds`` (``totp-locked``), from any address.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from typing import Any, Mapping
from urllib.parse import parse_qs, urlsplit

import pyotp
from twisted.internet import defer
from twisted.logger import Logger
from validate import ValidateError
from zope.interface import implementer

from sftpauth.auth.errors import LoginFailed
from sftpauth.auth.ldap.client import Entry
from sftpauth.auth.ldap.dn import normal_dn
from sftpauth.auth.ldap.extensions import ILDAPExtension, LDAPCredentials
from sftpauth.config import checks

DEFAULT_DIGITS = 6
ALLOWED_DIGITS = (6, 7, 8)
DRIFTS = (0, -1, 1)  # steps tried, the current one first
URI_PREFIX = "otpauth://totp/"
_CODE = "totp-code"
_TYPED = "totp-typed"  # password and code as typed, while N is not known yet
# Why a right password with the right code of 7 or 8 digits is refused at the BIND, in that one case.
_UNREAD_DIGITS = (
    f"the last {DEFAULT_DIGITS} characters were taken as the TOTP code without reading the account's otpauth URI, "
    "which needs a service_account_dn and bind_dn_type search, parent, relative or absolute: if its codes have "
    'more digits, the BIND got some of them; set "digits" in extension_configuration, or a service account'
)
_ALGORITHMS = ("SHA1", "SHA256", "SHA512")
_log = Logger()
_KEYS = ("digits", "lock_after_wrong_codes", "lock_seconds", "mfa_attribute")
# An account whose right password comes with this many wrong codes in a row
# has its TOTP logins refused for LOCK_SECONDS (``totp-locked``): the address
# bans alone let a botnet that knows a password try codes from many addresses.
LOCK_AFTER_WRONG_CODES = 10
LOCK_SECONDS = 900.0
LOCK_SCOPE = "totp-wrong-codes"


class InvalidTOTPURI(ValueError):
    """The attribute's value cannot be used; the message never holds the secret."""


def parse_totp_uri(uri: str) -> pyotp.TOTP:
    """A ``pyotp.TOTP`` from a Google Authenticator key URI, checked."""
    uri = uri.strip()
    if not uri.startswith(URI_PREFIX):
        raise InvalidTOTPURI(f"the value is not an {URI_PREFIX}... URI")
    query = parse_qs(urlsplit(uri).query, keep_blank_values=True)
    secret = (query.get("secret") or [""])[0]
    if not secret:
        raise InvalidTOTPURI("the URI has no secret")
    if query.get("encoder"):
        raise InvalidTOTPURI("the URI names an encoder: only RFC 6238 decimal codes are supported")
    algorithm = (query.get("algorithm") or ["SHA1"])[0]
    if algorithm not in _ALGORITHMS:
        raise InvalidTOTPURI(f"algorithm {algorithm!r} is not one of {', '.join(_ALGORITHMS)}")
    for name in ("digits", "period"):
        value = (query.get(name) or ["1"])[0]
        if not value.isascii() or not value.isdigit():
            raise InvalidTOTPURI(f"{name} {value!r} is not a whole number")
    digits = (query.get("digits") or [str(DEFAULT_DIGITS)])[0]
    if int(digits) not in ALLOWED_DIGITS:  # pyotp takes up to 10; authenticator apps show 6 or 8
        raise InvalidTOTPURI(f"digits {digits} is not supported (6, 7 or 8)")
    try:
        otp = pyotp.parse_uri(uri)
    except Exception as error:  # pyotp: ValueError, binascii.Error (bad base32)...
        message = str(error)
        if secret in message or not message:
            message = type(error).__name__
        raise InvalidTOTPURI(f"pyotp cannot use the URI: {message}") from None
    if not isinstance(otp, pyotp.TOTP):  # pragma: no cover - the prefix check makes it TOTP
        raise InvalidTOTPURI("the URI is not a TOTP key")
    return otp


def describe_totp(otp: pyotp.TOTP) -> str:
    """The URI's parameters, never its secret."""
    return f"{otp.digest().name.upper()}, {otp.digits} digits, {otp.interval} s period"


def matching_steps(otp: pyotp.TOTP, code: str, step: int) -> list[tuple[int, int]]:
    """(drift, step) of each step in reach whose code is ``code``; every candidate is computed."""
    matches = []
    for drift in DRIFTS:
        expected = otp.generate_otp(step + drift)
        if hmac.compare_digest(expected.encode("ascii"), code.encode("ascii")):
            matches.append((drift, step + drift))
    return matches


def step_drift(drift: int) -> str:
    return f"{drift:+d}" if drift else "0"


def _split(credentials: LDAPCredentials, typed: str, digits: int, why: str) -> None:
    """The last ``digits`` characters of ``typed`` become the code, the rest the BIND password."""
    a_code = f"{'an' if digits == 8 else 'a'} {digits}-digit TOTP code"  # "an 8-digit", "a 6-digit"
    if len(typed) < digits + 1:
        raise LoginFailed("totp-wrong-code", f"the password is too short to end with {a_code}{why}")
    code = typed[-digits:]
    if not re.fullmatch(r"[0-9]+", code):
        raise LoginFailed("totp-wrong-code", f"the password does not end with {a_code}{why}")
    credentials.password = typed[:-digits]
    credentials.data[_CODE] = code
    credentials.trace("totp", f"the last {digits} characters are the TOTP code; the rest is the password{why}")


def replay_key(dn: str, step: int) -> str:
    """The replay store's key: the account and the time step whose code was used.

    A step has one code per secret, so the code itself is not needed; left
    out, it cannot be recovered from the key (a hash of a 6-digit code can
    be reversed in seconds by whoever reads the Redis keys). Bounded in
    size and free of the DN's text.
    """
    material = "\0".join((normal_dn(dn), str(step))).encode("utf-8", "surrogatepass")
    return "totp-replay:" + hashlib.sha256(material).hexdigest()


def _account_key(dn: str) -> str:
    """The account's wrong-code counter and lock (bounded in size, as an address would be)."""
    return hashlib.sha256(normal_dn(dn).encode("utf-8", "surrogatepass")).hexdigest()


@implementer(ILDAPExtension)
class AugmentedTOTP:
    """``{"mfa_attribute": "totpSharedSecret"}``; optionally ``"digits": 8``, ``"lock_after_wrong_codes": 10``, ``"lock_seconds": 900``."""

    def __init__(self, configuration: Mapping[str, Any]):
        unknown = sorted(set(configuration) - set(_KEYS))
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(_KEYS)}")
        attribute = configuration.get("mfa_attribute")
        if attribute is not None and not isinstance(attribute, str):
            raise ValueError(f'"mfa_attribute": {attribute!r} is not a text; write the attribute name in double quotes, '
                             'e.g. {"mfa_attribute": "totpSharedSecret"}')
        if not isinstance(attribute, str) or not attribute.strip():
            raise ValueError(
                '"mfa_attribute" is required: the LDAP attribute holding the otpauth://totp/ URI, '
                'e.g. {"mfa_attribute": "totpSharedSecret"}'
            )
        try:
            checks.attribute(attribute.strip())
        except ValidateError as error:
            raise ValueError(f'"mfa_attribute": {error}') from None
        digits = configuration.get("digits")
        if digits is not None and (isinstance(digits, bool) or digits not in ALLOWED_DIGITS):
            raise ValueError(f'"digits": {digits!r} is not allowed; allowed: 6, 7, 8 (the digits of the users\' otpauth URIs)')
        self.mfa_attribute = attribute.strip()
        # None: each account's URI says (default 6); a number: the same for every account.
        self.digits = None if digits is None else int(digits)
        lock_after = configuration.get("lock_after_wrong_codes", LOCK_AFTER_WRONG_CODES)
        if isinstance(lock_after, bool) or not isinstance(lock_after, int) or lock_after < 0:
            raise ValueError(f'"lock_after_wrong_codes": {lock_after!r} is not a whole number of at least 0 (0: never lock)')
        lock_seconds = configuration.get("lock_seconds", LOCK_SECONDS)
        if isinstance(lock_seconds, bool) or not isinstance(lock_seconds, (int, float)) or not 0 < lock_seconds <= 86400:
            raise ValueError(f'"lock_seconds": {lock_seconds!r} is not a number of seconds from 1 to 86400')
        self.lock_after_wrong_codes = lock_after
        self.lock_seconds = float(lock_seconds)

    def secondFactorDigits(self) -> int:
        """Optional hook: SSH keyboard-interactive asks for a code (of this many digits, unless the URI says)."""
        return self.digits or DEFAULT_DIGITS

    def getExtraAttributes(self) -> tuple[str, ...]:
        return (self.mfa_attribute,)

    def updateCredentials(self, credentials: LDAPCredentials) -> LDAPCredentials:
        """Split the code off the password, before any LDAP traffic (6 digits until a URI says otherwise)."""
        password = credentials.password
        _split(credentials, password, self.digits or DEFAULT_DIGITS, "")
        if self.digits is None:
            credentials.data[_TYPED] = password
            credentials.read_entry_first = True
            # Cleared when the entry's URI is read before the BIND (updateCredentialsFromEntry).
            credentials.bind_password_note = _UNREAD_DIGITS
        return credentials

    def updateCredentialsFromEntry(self, credentials: LDAPCredentials, entry: Entry) -> LDAPCredentials:
        """Optional hook, before the user's BIND: split again with the digits of the entry's URI."""
        typed = credentials.data.get(_TYPED)
        if typed is None:
            return credentials
        # No usable URI: refused now, with the reason augmentEntry would give after the BIND. The BIND
        # would only send a password split at a guess (maybe with code digits) to the directory.
        otp = self._uri_of(entry, " (read before the BIND, which was not sent)")
        credentials.bind_password_note = ""  # the split follows the account's own URI
        if otp.digits == len(credentials.data[_CODE]):
            return credentials
        _split(credentials, typed, otp.digits, f" (the otpauth URI of {entry.dn} asks for {otp.digits} digits)")
        return credentials

    def _uri_of(self, entry: Entry, when: str = "") -> pyotp.TOTP:
        """The entry's one usable otpauth URI; else LoginFailed (totp-missing-secret, totp-invalid-secret) + ``when``."""
        attribute = self.mfa_attribute
        values = [value for value in entry.get(attribute) if value.strip()]
        if not values:
            raise LoginFailed(
                "totp-missing-secret", f"{entry.dn} has no {attribute} (absent, empty or not readable by sftpauth){when}"
            )
        if len(values) > 1:
            raise LoginFailed("totp-invalid-secret", f"{attribute} of {entry.dn} has {len(values)} values, not one{when}")
        try:
            return parse_totp_uri(values[0])
        except InvalidTOTPURI as error:
            raise LoginFailed("totp-invalid-secret", f"{attribute} of {entry.dn}: {error}{when}") from None

    def augmentEntry(self, entry: Entry, credentials: LDAPCredentials, client) -> defer.Deferred:
        return defer.ensureDeferred(self._verify(entry, credentials))

    async def _verify(self, entry: Entry, credentials: LDAPCredentials) -> Entry:
        code = credentials.data.get(_CODE)
        if code is None:  # pragma: no cover - updateCredentials always runs first
            raise LoginFailed("totp-wrong-code", "no TOTP code was split off the password")
        lock = _account_key(entry.dn)
        await self._refuse_locked(credentials, lock)
        attribute = self.mfa_attribute
        otp = self._uri_of(entry)
        if otp.digits != len(code):
            if self.digits is not None:
                why = f'set "digits": {otp.digits} for every user or none'
            else:
                why = (
                    "sftpauth could not read the URI before the BIND, which needs a service_account_dn and "
                    f'bind_dn_type search, parent, relative or absolute; or set "digits": {otp.digits} for every user'
                )
            raise LoginFailed(
                "totp-invalid-secret",
                f"{attribute} of {entry.dn} asks for {otp.digits}-digit codes but the last {len(code)} characters "
                f"of the password were taken as the code ({why})",
            )
        credentials.trace("totp", f"{attribute}: otpauth URI ({describe_totp(otp)})")
        now = credentials.clock.seconds()
        step = int(now // otp.interval)
        matches = matching_steps(otp, code, step)
        if not matches:
            locked = await self._count_wrong_code(credentials, lock)
            raise LoginFailed("totp-wrong-code", "the TOTP code matches none of the steps -1, 0, +1" + locked)
        for drift, matched in matches:
            # Valid while the current step is at most matched + 1; one more period of margin
            # covers clocks of other nodes sharing the store.
            ttl = (matched + 3) * otp.interval - now
            try:
                fresh = await credentials.state.replay.claim(replay_key(entry.dn, matched), ttl)
            except Exception as error:
                raise LoginFailed(
                    "service-unavailable", f"the TOTP replay store cannot answer: {type(error).__name__}: {error}"
                ) from None
            if not fresh:
                raise LoginFailed("totp-replayed", f"the TOTP code (step drift {step_drift(drift)}) was already used")
        credentials.trace("totp", f"TOTP code accepted (step drift {step_drift(matches[0][0])})")
        self._forget_wrong_codes(credentials, lock)
        return entry

    def _locks(self, credentials: LDAPCredentials):
        """The store of wrong-code counts and locks, or None when accounts are never locked."""
        return credentials.state.bans if self.lock_after_wrong_codes else None

    async def _refuse_locked(self, credentials: LDAPCredentials, lock: str) -> None:
        """``totp-locked`` while the account's wrong codes keep its TOTP logins closed; no code is checked then."""
        bans = self._locks(credentials)
        if bans is None:
            return
        try:
            left = await bans.ban_left(LOCK_SCOPE, lock)
        except Exception:
            _log.failure("cannot tell whether an account's TOTP logins are locked; checking its code")
            return
        if left > 0:
            raise LoginFailed(
                "totp-locked",
                f"{self.lock_after_wrong_codes} wrong TOTP codes in a row: this account's logins are refused "
                f"for {math.ceil(left)} more seconds, whatever the code",
            )

    async def _count_wrong_code(self, credentials: LDAPCredentials, lock: str) -> str:
        """Count a wrong code that came with the right password; the audit detail it adds."""
        bans = self._locks(credentials)
        if bans is None:
            return ""
        try:
            counted = await bans.add_failure(LOCK_SCOPE, lock, self.lock_after_wrong_codes, self.lock_seconds)
        except Exception:
            _log.failure("cannot count a wrong TOTP code of an account")
            return ""
        if counted.banned_now:
            return f"; {counted.count} in a row: this account's logins are refused for {self.lock_seconds:g} seconds"
        return f" ({counted.count} of {self.lock_after_wrong_codes} in a row before the account is locked)"

    def _forget_wrong_codes(self, credentials: LDAPCredentials, lock: str) -> None:
        bans = self._locks(credentials)
        if bans is not None:
            bans.reset(LOCK_SCOPE, lock).addErrback(lambda failure: _log.failure("cannot reset an account's wrong TOTP codes", failure))


def new_totp_uri(username: str, issuer: str, digits: int = DEFAULT_DIGITS) -> str:
    """A fresh 160-bit secret as a Google Authenticator key URI (SHA1, 30 s: what every app supports)."""
    otp = pyotp.TOTP(pyotp.random_base32(32), digits=digits, name=username, issuer=issuer or None)
    uri = otp.provisioning_uri()
    parse_totp_uri(uri)  # what sftpauth writes, sftpauth must read
    return uri


def ldif_line(attribute: str, value: str) -> str:
    """``attribute: value``, or ``attribute:: base64`` when RFC 2849 does not allow the plain form."""
    import base64

    safe = value.isascii() and value.isprintable() and not value.startswith((" ", ":", "<")) and not value.endswith(" ")
    if safe:
        return f"{attribute}: {value}"
    return f"{attribute}:: {base64.b64encode(value.encode('utf-8')).decode('ascii')}"


def terminal_qr_code(text: str) -> str:
    """``text`` as a QR code of Unicode half blocks (two rows per line), quiet zone included."""
    import io

    import segno

    output = io.StringIO()
    segno.make(text, error="m", micro=False).terminal(out=output, compact=True, border=2)
    return output.getvalue()
