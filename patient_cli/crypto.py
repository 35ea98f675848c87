"""Fernet encryption with several keys: the first encrypts, every key decrypts.

Keys are identified by a short public id (a truncated hash), which is what the
database stores next to each token and what `status` shows; the key itself is
never printed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from patient_cli.errors import ConfigError, DecryptionFailed

KEY_ID_LENGTH = 12


def key_id(key: bytes) -> str:
    """A short, non-secret identifier of a Fernet key."""
    return hashlib.sha256(b"patient-records key id\x00" + key.strip()).hexdigest()[:KEY_ID_LENGTH]


def generate_key() -> bytes:
    return Fernet.generate_key()


def parse_keys(text: str) -> list[bytes]:
    """Split a comma-separated key list; each must be a valid Fernet key."""
    parts = [p.strip() for p in text.replace("\n", ",").split(",") if p.strip()]
    if not parts:
        raise ConfigError("the encryption key is empty")
    keys = []
    for number, part in enumerate(parts, start=1):
        key = part.encode("ascii", errors="replace")
        try:
            Fernet(key)
            # Only the canonical spelling: Fernet's decoder skips stray characters,
            # so "KEY!" would work as KEY yet get a different key id.
            if base64.urlsafe_b64encode(base64.urlsafe_b64decode(key)) != key:
                raise ValueError("not canonical base64")
        except (ValueError, TypeError):
            where = f"key {number} of {len(parts)}" if len(parts) > 1 else "the key"
            raise ConfigError(
                f"{where} is not a valid Fernet key (32 url-safe base64-encoded bytes); "
                "create one with `patient-records keygen`"
            ) from None
        keys.append(key)
    return keys


class Keyring:
    """The configured Fernet keys, newest (encrypting) first."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ConfigError("no encryption key configured")
        self._fernets = [Fernet(k) for k in keys]
        self._multi = MultiFernet(self._fernets)
        self.key_ids = [key_id(k) for k in keys]
        self.primary_id = self.key_ids[0]

    def __repr__(self) -> str:
        return f"Keyring(key_ids={self.key_ids!r})"

    def encrypt(self, plaintext: bytes) -> bytes:
        return self._fernets[0].encrypt(plaintext)

    def decrypt(self, token: bytes | memoryview, what: str = "data") -> bytes:
        try:
            return self._multi.decrypt(bytes(token))
        except InvalidToken:
            raise DecryptionFailed(f"cannot decrypt {what}: wrong key or tampered data") from None

    def rotate(self, token: bytes | memoryview, what: str = "data") -> bytes:
        """Re-encrypt a token under the first key, keeping its plaintext and timestamp."""
        try:
            return self._multi.rotate(bytes(token))
        except InvalidToken:
            raise DecryptionFailed(f"cannot decrypt {what}: wrong key or tampered data") from None

    def decrypt_with_id(self, token: bytes | memoryview, what: str = "data") -> tuple[bytes, str]:
        """Decrypt and also say which key did it (for rotation bookkeeping)."""
        raw = bytes(token)
        for fernet, kid in zip(self._fernets, self.key_ids, strict=True):
            try:
                return fernet.decrypt(raw), kid
            except InvalidToken:
                continue
        raise DecryptionFailed(f"cannot decrypt {what}: wrong key or tampered data")


def keyed_digest(key: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 over length-prefixed parts (unambiguous concatenation)."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(len(part).to_bytes(8, "big"))
        mac.update(part)
    return mac.digest()
