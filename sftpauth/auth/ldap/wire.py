"""LDAP messages read from a byte stream, for the client and the embedded directory.

ldaptor's own loop prints a 2 KB repr of its decoder to stdout for a
top-level tag it does not know, skips those bytes and waits for more: an
HTTP answer, a TLS record or a port scanner's probe then looks like a peer
that never answers. Every LDAP message is a BER SEQUENCE (RFC 4511 §4.2),
so any other first byte is refused at once. Inside a message ldaptor
skips an element whose tag it does not know, and prints the same repr:
:data:`LDAP_DECODER` skips it without printing.
"""

from __future__ import annotations

from typing import Optional

from ldaptor.protocols import pureber, pureldap

LDAP_MESSAGE = 0x30  # the tag of a BER SEQUENCE, which every LDAPMessage is
# The largest message read (slapd's own default for an authenticated client is 4 MiB): a peer
# announcing more is refused at its header, never buffered.
MAX_MESSAGE = 16 * 1024 * 1024


class _Skipped:
    """What an element of a tag no context knows decodes to: nothing, as ldaptor skips it."""

    @classmethod
    def fromBER(cls, tag, content, berdecoder=None) -> None:
        return None


class _LastContext(pureber.BERDecoderContext):
    """The end of every fallback chain: an unknown tag is skipped, without ldaptor's ``print()`` of its decoder.

    That print went to the server log as ``[stdout#info]`` lines of about
    2 KB, once per answer of an LDAP server sending something ldaptor does
    not know.
    """

    def lookup_id(self, id):
        return super().lookup_id(id) or _Skipped


# ldaptor's LDAPClient.berdecoder and LDAPServer.berdecoder, ending in _LastContext.
LDAP_DECODER = pureldap.LDAPBERDecoderContext_TopLevel(
    inherit=pureldap.LDAPBERDecoderContext_LDAPMessage(
        fallback=pureldap.LDAPBERDecoderContext(fallback=_LastContext()),
        inherit=pureldap.LDAPBERDecoderContext(fallback=_LastContext()),
    )
)


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


def message_size(buffer: bytes) -> Optional[int]:
    """The whole size of the LDAP message that begins ``buffer``, from its BER header; None until the header is in.

    LDAP uses the definite form of lengths only (RFC 4511 §5.1), in at
    most 4 bytes here: anything else is :class:`NotLDAP`.
    """
    if not buffer:
        return None
    if buffer[0] != LDAP_MESSAGE:
        raise NotLDAP(f"it does not begin with an LDAP message: byte 0x{buffer[0]:02x}")
    if len(buffer) < 2:
        return None
    first = buffer[1]
    if first < 0x80:
        return 2 + first
    count = first & 0x7F
    if count == 0 or count > 4:
        raise NotLDAP("its length is not a definite length of at most 4 bytes")
    if len(buffer) < 2 + count:
        return None
    return 2 + count + int.from_bytes(buffer[2 : 2 + count], "big")


class MessageBuffer:
    """The bytes of a connection, cut into LDAP messages of at most ``limit`` bytes.

    The bytes of a message are joined once, when all of them are in (a
    4 MB answer in 64 KB reads is not copied again at every read), and a
    message announced over ``limit`` is refused at its header.
    """

    def __init__(self, limit: int = MAX_MESSAGE):
        self.limit = limit
        self._buffer = b""
        self._offset = 0  # where the next message begins in _buffer
        self._parts: list[bytes] = []  # received after _buffer, not joined yet
        self._pending = 0  # bytes in _parts
        self._wanted = 1  # bytes the next message needs before it is worth looking again

    def feed(self, data: bytes) -> None:
        self._parts.append(data)
        self._pending += len(data)

    def clear(self) -> None:
        self.__init__(self.limit)

    def next(self, decoder) -> Optional[object]:
        """The next whole message, or None until more bytes come; :class:`NotLDAP` for what is not LDAP."""
        available = len(self._buffer) - self._offset + self._pending
        if available < self._wanted:
            return None
        if self._parts:
            self._buffer = self._buffer[self._offset :] + b"".join(self._parts)
            self._offset, self._parts, self._pending = 0, [], 0
        rest = self._buffer[self._offset : self._offset + 6]  # the tag and the longest length
        size = message_size(rest)
        if size is None:
            self._wanted = len(rest) + 1
            return None
        if size > self.limit:
            raise NotLDAP(f"a message of {size} bytes, over the limit of {self.limit // (1024 * 1024)} MiB")
        if available < size:
            self._wanted = size
            return None
        message, used = decode_message(decoder, self._buffer[self._offset : self._offset + size])
        if used != size:
            raise NotLDAP("its length does not match its content")
        self._offset += size
        if self._offset == len(self._buffer):
            self._buffer, self._offset = b"", 0
        self._wanted = 1
        return message
