"""Open a stored Fernet token, as the minimal baselines do: either the usual
base64 text form (cryptography's Fernet) or the unencoded binary form (the same
bytes before base64: version, timestamp, IV, AES-128-CBC ciphertext, HMAC-SHA256),
opened with the same primitives Fernet uses, without the base64 round trip.
"""

from __future__ import annotations

import base64
from collections.abc import Callable

from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.hmac import HMAC

BINARY_VERSION = 0x80  # a base64 token starts with "g" instead


def token_opener(key: str) -> Callable[[bytes], bytes]:
    fernet = Fernet(key)
    raw = base64.urlsafe_b64decode(key)
    signing, encryption = raw[:16], raw[16:]

    def open_token(token: bytes) -> bytes:
        if token[0] != BINARY_VERSION:
            return fernet.decrypt(token)
        view = memoryview(token)
        mac = HMAC(signing, SHA256())
        mac.update(view[:-32])
        mac.verify(bytes(view[-32:]))
        decryptor = Cipher(algorithms.AES(encryption), modes.CBC(bytes(view[9:25]))).decryptor()
        padded = decryptor.update(view[25:-32]) + decryptor.finalize()
        return padded[: -padded[-1]]

    return open_token
