"""Fernet encryption with several keys: the first encrypts, every key decrypts.

Tokens are stored in binary form (see FernetKey); the original service's text
tokens are read with `decrypt_text_token`.

Keys are identified by a short public id (a truncated hash), which is what the
database stores next to each token and what `status` shows; the key itself is
never printed.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import struct
import threading
import time
from collections.abc import Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.hmac import HMAC

from patient_cli.errors import ConfigError, DecryptionFailed

Buffer = bytes | bytearray | memoryview

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


FERNET_VERSION = 0x80
_HEADER = struct.Struct(">BQ")  # version, timestamp
_IV_SIZE = 16
_MAC_SIZE = 32
_MIN_TOKEN = _HEADER.size + _IV_SIZE + 16 + _MAC_SIZE
_ONE_CALL = 64 << 10


def token_capacity(plaintext_length: int) -> int:
    """Bytes `encrypt_into` needs for a plaintext of this length (the token, and
    the block of slack cryptography's `update_into` asks for)."""
    return _HEADER.size + _IV_SIZE + (plaintext_length // 16 + 1) * 16 + _MAC_SIZE + 15


class FernetKey:
    """One Fernet key, producing and opening tokens in binary form.

    A token here is exactly a Fernet token (version, timestamp, IV, AES-128-CBC
    ciphertext, HMAC-SHA256) before its base64 encoding: base64url-encode it and
    cryptography's Fernet decrypts it, and vice versa. Storing it unencoded saves
    a quarter of the bytes, and skipping the encode/decode halves the CPU time,
    which is the ceiling for large files.
    """

    def __init__(self, key: bytes) -> None:
        raw = base64.urlsafe_b64decode(key)
        if len(raw) != 32:
            raise ValueError("a Fernet key is 32 bytes")
        self._signing_key = raw[:16]
        self._signing = HmacSha256(self._signing_key)
        self._encryption_key = raw[16:]
        self._local = threading.local()

    def encrypt(self, plaintext: bytes, timestamp: int | None = None) -> bytes:
        encryptor = self._encryptor()
        pad = bytes((16 - len(plaintext) % 16,)) * (16 - len(plaintext) % 16)  # PKCS7
        header = _HEADER.pack(FERNET_VERSION, int(time.time()) if timestamp is None else timestamp)
        try:
            if len(plaintext) <= _ONE_CALL:  # one call (and a copy) is cheaper
                body = header + encryptor.update(os.urandom(_IV_SIZE) + plaintext + pad)
            else:
                iv = encryptor.update(os.urandom(_IV_SIZE))
                body = b"".join((header, iv, encryptor.update(plaintext), encryptor.update(pad)))
        except BaseException:
            self._drop_encryptor()
            raise
        return body + self._signing.digest(body)

    def encrypt_into(self, parts: Sequence[Buffer], out: bytearray) -> int:
        """Write the token of the concatenated `parts` into `out` and return its
        length; `out` must hold `token_capacity` of that plaintext length.

        For chunks: writing into a reused buffer spares allocating (and the
        kernel zeroing) a fresh megabyte for each of the ciphertext, the token
        and their joins, which cost about as much as the encryption itself.
        """
        encryptor = self._encryptor()
        length = sum(len(memoryview(part)) for part in parts)
        pad = 16 - length % 16  # PKCS7
        if len(out) < token_capacity(length):
            raise ValueError("the output buffer is too small for this token")
        _HEADER.pack_into(out, 0, FERNET_VERSION, int(time.time()))
        with memoryview(out) as view:
            try:
                end = _HEADER.size
                end += encryptor.update_into(os.urandom(_IV_SIZE), view[end:])
                for part in parts:
                    end += encryptor.update_into(part, view[end:])
                end += encryptor.update_into(bytes((pad,)) * pad, view[end:])
            except BaseException:
                self._drop_encryptor()
                raise
            view[end : end + _MAC_SIZE] = self._signing.digest(view[:end])
        return end + _MAC_SIZE

    def _encryptor(self) -> CipherContext:
        # One AES-CBC context per thread serves every token: building a context
        # costs more than encrypting a small file. A token's IV is the context's
        # encryption of 16 fresh random bytes (XORed with the previous block):
        # a uniformly random block, as Fernet requires (the method of NIST SP
        # 800-38A, appendix C), and the CBC chain then continues from exactly
        # that IV, so the ciphertext is what a new context with this IV makes.
        encryptor: CipherContext | None = getattr(self._local, "encryptor", None)
        if encryptor is None:
            mode = modes.CBC(os.urandom(_IV_SIZE))
            encryptor = Cipher(algorithms.AES(self._encryption_key), mode).encryptor()
            self._local.encryptor = encryptor
        return encryptor

    def _drop_encryptor(self) -> None:
        # Interrupted mid-token (Ctrl-C between two updates, a bad part), the
        # context may hold part of a block, which would shift every later token:
        # start the next one from a new context.
        self._local.encryptor = None

    def decrypt(self, token: bytes) -> bytes | None:
        """The plaintext, or None when this key did not make this (intact) token."""
        view = memoryview(token)
        if len(view) < _MIN_TOKEN or view[0] != FERNET_VERSION or (len(view) - 57) % 16:
            return None
        mac = HMAC(self._signing_key, SHA256())
        mac.update(view[:-_MAC_SIZE])
        try:
            mac.verify(bytes(view[-_MAC_SIZE:]))  # constant-time comparison
        except InvalidSignature:
            return None
        iv = bytes(view[_HEADER.size : _HEADER.size + _IV_SIZE])
        decryptor = Cipher(algorithms.AES(self._encryption_key), modes.CBC(iv)).decryptor()
        padded = decryptor.update(view[_HEADER.size + _IV_SIZE : -_MAC_SIZE]) + decryptor.finalize()
        pad = padded[-1] if padded else 0
        if not 1 <= pad <= 16 or padded[-pad:] != bytes((pad,)) * pad:
            return None
        return padded[:-pad]


def token_timestamp(token: bytes) -> int:
    return int(_HEADER.unpack_from(token)[1])


class Keyring:
    """The configured Fernet keys, newest (encrypting) first; tokens in binary form."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ConfigError("no encryption key configured")
        self._keys = [FernetKey(k) for k in keys]
        self.key_ids = [key_id(k) for k in keys]
        self.primary_id = self.key_ids[0]

    def __repr__(self) -> str:
        return f"Keyring(key_ids={self.key_ids!r})"

    def encrypt(self, plaintext: bytes) -> bytes:
        return self._keys[0].encrypt(plaintext)

    def encrypt_into(self, parts: Sequence[Buffer], out: bytearray) -> int:
        return self._keys[0].encrypt_into(parts, out)

    def decrypt(self, token: bytes | memoryview, what: str = "data") -> bytes:
        return self.decrypt_with_id(token, what)[0]

    def decrypt_with_id(self, token: bytes | memoryview, what: str = "data") -> tuple[bytes, str]:
        """Decrypt and also say which key did it (for rotation bookkeeping)."""
        raw = bytes(token)
        for key, kid in zip(self._keys, self.key_ids, strict=True):
            plain = key.decrypt(raw)
            if plain is not None:
                return plain, kid
        raise DecryptionFailed(f"cannot decrypt {what}: wrong key or tampered data")

    def rotate(self, token: bytes | memoryview, what: str = "data") -> bytes:
        """Re-encrypt a token under the first key, keeping its plaintext and timestamp."""
        raw = bytes(token)
        plain = self.decrypt(raw, what)
        return self._keys[0].encrypt(plain, timestamp=token_timestamp(raw))

    def decrypt_text_token(self, token: str, what: str = "data") -> bytes:
        """Decrypt a standard (base64) Fernet token, as the original service stored."""
        try:
            raw = base64.urlsafe_b64decode(token.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            raise DecryptionFailed(f"cannot decrypt {what}: wrong key or tampered data") from None
        return self.decrypt(raw, what)


class HmacSha256:
    """HMAC-SHA256 (RFC 2104) under one key, with the key's inner and outer
    hash states computed once: half the cost of `hmac.digest` per message,
    which matters at three HMACs for every small file imported."""

    def __init__(self, key: bytes) -> None:
        block = (hashlib.sha256(key).digest() if len(key) > 64 else key).ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    def digest(self, *parts: Buffer) -> bytes:
        inner = self._inner.copy()
        for part in parts:
            inner.update(part)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


@functools.lru_cache(maxsize=8)
def _hmac_for(key: bytes) -> HmacSha256:
    return HmacSha256(key)


def keyed_digest(key: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 over length-prefixed parts (unambiguous concatenation)."""
    framed = []
    for part in parts:
        framed.append(len(part).to_bytes(8, "big"))
        framed.append(part)
    return _hmac_for(key).digest(*framed)
