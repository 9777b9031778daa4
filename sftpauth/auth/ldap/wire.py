"""LDAP messages read from a byte stream, for the client and the embedded directory.

ldaptor's own loop prints a 2 KB repr of its decoder to stdout for a
top-level tag it does not know, skips those bytes and waits for more: an
HTTP answer, a TLS record or a port scanner's probe then looks like a peer
that never answers. Every LDAP message is a BER SEQUENCE (RFC 4511 §4.2),
so any other first byte is refused at once.
"""

from __future__ import annotations

from ldaptor.protocols import pureber

LDAP_MESSAGE = 0x30  # the tag of a BER SEQUENCE, which every LDAPMessage is


class NotLDAP(Exception):
    """What the peer sent is not an LDAP message; ``str()`` says why in a few words."""


def decode_message(decoder, buffer: bytes) -> tuple[object, int]:
    """The first LDAP message of ``buffer`` and the bytes it used; ``(None, 0)`` while it is incomplete.

    Raises :class:`NotLDAP` when the bytes cannot begin an LDAP message,
    cannot be decoded, or hold an operation ldaptor does not know.
    """
    if not buffer:
        return None, 0
    if buffer[0] != LDAP_MESSAGE:
        raise NotLDAP(f"it does not begin with an LDAP message: byte 0x{buffer[0]:02x}")
    try:
        message, used = pureber.berDecodeObject(decoder, buffer)
    except pureber.BERExceptionInsufficientData:
        return None, 0
    except Exception as error:  # ldaptor raises what its decoders meet: ValueError, IndexError, assertions...
        raise NotLDAP(f"it cannot be decoded: {type(error).__name__}") from error
    if message is None:
        raise NotLDAP("an unknown LDAP operation")
    return message, used
