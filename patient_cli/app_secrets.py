"""Long-lived HMAC keys kept in the database, encrypted under the Fernet keys.

The import fingerprint key and the audit-chain key must outlive any Fernet key
(rotation retires old ones), so they are random, created once, and only their
encryption changes on `rotate-key`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from patient_cli import sql
from patient_cli.crypto import Keyring
from patient_cli.db import Connection

FINGERPRINT_KEY = "import-fingerprint-hmac"
AUDIT_KEY = "audit-chain-hmac"
SECRET_NAMES = (FINGERPRINT_KEY, AUDIT_KEY)


def get_secret(conn: Connection, keyring: Keyring, name: str) -> bytes:
    """Return secret `name`, creating it on first use (safe under concurrency)."""
    with conn.cursor() as cur:
        cur.execute(sql.SELECT_SECRET, (name,))
        row = cur.fetchone()
        if row is None:
            _check_key_reads_stored_records(conn, keyring)
            fresh = keyring.encrypt(os.urandom(32))
            cur.execute(sql.INSERT_SECRET, (name, keyring.primary_id, fresh))
            cur.execute(sql.SELECT_SECRET, (name,))
            row = cur.fetchone()
        assert row is not None
        return keyring.decrypt(row[0], what="stored data")


def get_existing_secrets(
    conn: Connection, keyring: Keyring, names: Sequence[str]
) -> dict[str, bytes]:
    """The secrets among `names` that exist already, decrypted; creates none."""
    with conn.cursor() as cur:
        cur.execute(sql.SELECT_SECRETS, (list(names),))
        rows = cur.fetchall()
    return {name: keyring.decrypt(token, what="stored data") for name, token in rows}


def _check_key_reads_stored_records(conn: Connection, keyring: Keyring) -> None:
    """Raise DecryptionFailed when records exist that the key cannot read.

    A secret created under a wrong key (say, the first command after upgrading a
    seed-era database, run with a mistyped key) would lock the right key out.
    """
    with conn.cursor() as cur:
        cur.execute(sql.SELECT_ANY_RECORD_TOKEN)
        row = cur.fetchone()
    if row is not None:
        record_id, meta, legacy_data = row
        if meta is not None:
            keyring.decrypt(meta, what=f"record {record_id}")
        else:
            keyring.decrypt_text_token(legacy_data, what=f"record {record_id}")
