"""The Keyring: first key encrypts, every key decrypts; key ids are stable and
reveal nothing; key parsing is strict and its errors never echo the key."""

from __future__ import annotations

import base64
import hashlib
import hmac
import threading

import pytest
from cryptography.fernet import Fernet
from hypothesis import given, settings
from hypothesis import strategies as st

from patient_cli.crypto import (
    KEY_ID_LENGTH,
    FernetKey,
    HmacSha256,
    Keyring,
    generate_key,
    key_id,
    keyed_digest,
    parse_keys,
    token_capacity,
)
from patient_cli.errors import ConfigError, DecryptionFailed

OLD = Fernet.generate_key()
NEW = Fernet.generate_key()


@settings(max_examples=25, deadline=None)
@given(st.binary(max_size=2048))
def test_round_trip(plaintext: bytes) -> None:
    keyring = Keyring([NEW, OLD])
    token = keyring.encrypt(plaintext)
    assert keyring.decrypt(token) == plaintext
    assert keyring.decrypt(memoryview(token)) == plaintext


def b64(token: bytes) -> bytes:
    return base64.urlsafe_b64encode(token)


def unb64(token: bytes) -> bytes:
    return base64.urlsafe_b64decode(token)


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=4096))
def test_binary_tokens_are_fernet_tokens_both_ways(plaintext: bytes) -> None:
    """Our binary tokens are exactly Fernet's, minus base64: cryptography's Fernet
    reads ours, and we read Fernet's."""
    assert Fernet(NEW).decrypt(b64(Keyring([NEW]).encrypt(plaintext))) == plaintext
    assert Keyring([NEW]).decrypt(unb64(Fernet(NEW).encrypt(plaintext))) == plaintext
    assert Keyring([NEW]).decrypt_text_token(Fernet(NEW).encrypt(plaintext).decode()) == plaintext


def test_every_tampered_byte_is_refused() -> None:
    token = Keyring([NEW]).encrypt(b"0123456789abcdef" * 3)
    for position in range(len(token)):
        damaged = bytearray(token)
        damaged[position] ^= 0x01
        with pytest.raises(DecryptionFailed):
            Keyring([NEW]).decrypt(bytes(damaged))
    for cut in (1, 16, 32, len(token) - 1):
        with pytest.raises(DecryptionFailed):
            Keyring([NEW]).decrypt(token[:-cut])


def test_rotate_keeps_plaintext_and_timestamp() -> None:
    old = Keyring([OLD]).encrypt(b"kept")
    rotated = Keyring([NEW, OLD]).rotate(old)
    assert Keyring([NEW]).decrypt(rotated) == b"kept"
    assert rotated[:9] == old[:9]  # version and timestamp
    with pytest.raises(DecryptionFailed):
        Keyring([OLD]).decrypt(rotated)


def test_first_key_encrypts_and_every_key_decrypts() -> None:
    old_token = Keyring([OLD]).encrypt(b"written long ago")
    keyring = Keyring([NEW, OLD])
    assert keyring.decrypt(old_token) == b"written long ago"
    new_token = keyring.encrypt(b"written today")
    assert Fernet(NEW).decrypt(b64(new_token)) == b"written today"
    with pytest.raises(DecryptionFailed):
        Keyring([OLD]).decrypt(new_token)


def test_decrypt_with_id_names_the_key_that_worked() -> None:
    keyring = Keyring([NEW, OLD])
    assert keyring.decrypt_with_id(unb64(Fernet(OLD).encrypt(b"x"))) == (b"x", key_id(OLD))
    assert keyring.decrypt_with_id(unb64(Fernet(NEW).encrypt(b"y"))) == (b"y", key_id(NEW))
    with pytest.raises(DecryptionFailed, match=r"^cannot decrypt thing: wrong key or tampered"):
        keyring.decrypt_with_id(unb64(Fernet(generate_key()).encrypt(b"z")), what="thing")


def test_wrong_key_and_tampering_raise_decryption_failed() -> None:
    token = bytearray(Keyring([OLD]).encrypt(b"secret"))
    with pytest.raises(DecryptionFailed) as caught:
        Keyring([NEW]).decrypt(bytes(token), what="record 5")
    assert caught.value.message == "cannot decrypt record 5: wrong key or tampered data"
    assert caught.value.exit_code == 7
    token[20] ^= 1
    with pytest.raises(DecryptionFailed):
        Keyring([OLD]).decrypt(bytes(token))
    with pytest.raises(DecryptionFailed):
        Keyring([OLD]).decrypt(b"not a token at all")


def test_key_ids_are_short_stable_distinct_and_not_the_key() -> None:
    assert key_id(OLD) == key_id(OLD + b"\n")
    assert key_id(OLD) != key_id(NEW)
    assert len(key_id(OLD)) == KEY_ID_LENGTH
    assert key_id(OLD) not in OLD.decode()
    keyring = Keyring([NEW, OLD])
    assert keyring.key_ids == [key_id(NEW), key_id(OLD)]
    assert keyring.primary_id == key_id(NEW)


def test_repr_shows_ids_not_keys() -> None:
    text = repr(Keyring([NEW, OLD]))
    assert NEW.decode() not in text and OLD.decode() not in text
    assert key_id(NEW) in text


def test_keyring_needs_a_key() -> None:
    with pytest.raises(ConfigError, match="no encryption key configured"):
        Keyring([])


def test_parse_keys_splits_on_commas_and_newlines() -> None:
    text = f"  {NEW.decode()} ,\n{OLD.decode()},, \n"
    assert parse_keys(text) == [NEW, OLD]


@pytest.mark.parametrize(
    "bad",
    [
        "short",
        base64.urlsafe_b64encode(b"x" * 31).decode(),
        base64.urlsafe_b64encode(b"x" * 33).decode(),
        OLD.decode() + "!",
        OLD.decode() + "x",
        OLD.decode()[:-1],  # padding missing
        OLD.decode().replace("=", "") + "==",
        "ü" * 44,
    ],
)
def test_parse_keys_refuses_anything_but_a_canonical_fernet_key(bad: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_keys(bad)
    assert caught.value.message == (
        "the key is not a valid Fernet key (32 url-safe base64-encoded bytes); "
        "create one with `patient-records keygen`"
    )
    assert bad not in caught.value.message


def test_parse_keys_says_which_key_is_bad() -> None:
    with pytest.raises(ConfigError, match=r"^key 2 of 3 is not a valid Fernet key"):
        parse_keys(f"{NEW.decode()},nope,{OLD.decode()}")


def test_parse_keys_refuses_an_empty_list() -> None:
    with pytest.raises(ConfigError, match=r"^the encryption key is empty$"):
        parse_keys(" ,\n, ")


def test_generated_keys_are_valid_and_unique() -> None:
    keys = {generate_key() for _ in range(5)}
    assert len(keys) == 5
    assert parse_keys(",".join(k.decode() for k in keys))


def test_keyed_digest_is_keyed_and_unambiguous() -> None:
    key = b"k" * 32
    assert keyed_digest(key, b"ab", b"c") != keyed_digest(key, b"a", b"bc")
    assert keyed_digest(key, b"abc") != keyed_digest(key, b"ab", b"c")
    assert keyed_digest(key, b"x") != keyed_digest(b"j" * 32, b"x")
    assert keyed_digest(key, b"x") == keyed_digest(key, b"x")
    assert len(keyed_digest(key, b"x")) == 32


def test_ivs_are_fresh_and_tokens_interoperate_from_several_threads() -> None:
    # Each thread keeps one CBC context for all its tokens; every token must still
    # carry its own random IV and decrypt with cryptography's Fernet on its own.
    key = Fernet.generate_key()
    fernet_key = FernetKey(key)
    made: dict[int, list[tuple[bytes, bytes]]] = {}

    def work(number: int) -> None:
        plaintexts = [bytes([number]) * size for size in (0, 1, 15, 16, 17, 1000) * 50]
        made[number] = [(p, fernet_key.encrypt(p)) for p in plaintexts]

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    tokens = [pair for pairs in made.values() for pair in pairs]
    assert len(tokens) == 4 * 300
    assert len({token[9:25] for _, token in tokens}) == len(tokens)  # distinct IVs
    reference = Fernet(key)
    for plaintext, token in tokens:
        assert reference.decrypt(base64.urlsafe_b64encode(token)) == plaintext


@settings(max_examples=60, deadline=None)
@given(key=st.binary(max_size=200), parts=st.lists(st.binary(max_size=300), max_size=4))
def test_hmac_with_precomputed_states_is_hmac_sha256(key: bytes, parts: list[bytes]) -> None:
    expected = hmac.new(key, b"".join(parts), hashlib.sha256).digest()
    assert HmacSha256(key).digest(*parts) == expected


@settings(max_examples=40, deadline=None)
@given(parts=st.lists(st.binary(max_size=3000), max_size=4))
def test_encrypt_into_writes_a_fernet_token_of_the_joined_parts(parts: list[bytes]) -> None:
    key = Fernet.generate_key()
    out = bytearray(token_capacity(sum(map(len, parts))))
    used = FernetKey(key).encrypt_into([memoryview(p) for p in parts], out)
    token = bytes(out[:used])
    assert Fernet(key).decrypt(base64.urlsafe_b64encode(token)) == b"".join(parts)
    assert FernetKey(key).decrypt(token) == b"".join(parts)


def test_encrypt_into_refuses_a_short_buffer() -> None:
    with pytest.raises(ValueError):
        FernetKey(NEW).encrypt_into([b"x" * 100], bytearray(100))


def test_a_token_interrupted_midway_does_not_shift_the_next_ones() -> None:
    # A failure between two updates (here a part that is not bytes, after five
    # bytes went in) must not leave part of a block in the reused CBC context.
    key = Fernet.generate_key()
    fernet_key = FernetKey(key)
    out = bytearray(token_capacity(100))
    with pytest.raises(TypeError):
        fernet_key.encrypt_into([b"x" * 5, object()], out)  # type: ignore[list-item]
    token = fernet_key.encrypt(b"after")
    assert Fernet(key).decrypt(base64.urlsafe_b64encode(token)) == b"after"
    used = fernet_key.encrypt_into([b"again"], out)
    assert fernet_key.decrypt(bytes(out[:used])) == b"again"
