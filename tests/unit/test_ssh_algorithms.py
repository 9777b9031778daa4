"""The SSH algorithms the service offers: modern ones only (no SHA-1, CBC, 3DES or MD5)."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.conch.ssh import keys

from sftpauth import ssh


def test_only_modern_ssh_algorithms_are_offered():
    """No SHA-1 key exchange or host-key signature, no CBC or 3DES, no MD5 or SHA-1 MAC; the modern ones stay."""

    class Settings:
        id = "sftp"

    class Runtime:
        reactor = None
        portal = None

    host_keys = {
        b"ssh-ed25519": keys.Key(ed25519.Ed25519PrivateKey.generate()),
        b"ssh-rsa": keys.Key(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    }
    built = ssh.SFTPFactory(Settings(), Runtime(), host_keys).buildProtocol(None)
    offered = set(built.supportedKeyExchanges + built.supportedCiphers + built.supportedMACs + built.supportedPublicKeys)
    weak = {
        b"diffie-hellman-group14-sha1", b"diffie-hellman-group1-sha1", b"diffie-hellman-group-exchange-sha1",
        b"ssh-rsa", b"ssh-dss", b"aes128-cbc", b"aes192-cbc", b"aes256-cbc", b"3des-cbc", b"3des-ctr",
        b"hmac-md5", b"hmac-sha1",
    }
    assert offered & weak == set()
    assert {b"curve25519-sha256", b"ecdh-sha2-nistp256", b"aes256-ctr", b"aes128-ctr", b"hmac-sha2-256", b"hmac-sha2-512"} <= offered
    assert {b"ssh-ed25519", b"rsa-sha2-256", b"rsa-sha2-512"} <= set(built.supportedPublicKeys)
    assert built.supportedCompressions == [b"none"]
