"""Long-lived HMAC keys kept in the database, encrypted under the Fernet keys.

The import fingerprint key and the audit-chain key must outlive any Fernet key
(rotation retires old ones), so they are random, created once, and only their
encryption changes on `rotate-key`.
"""

from __future__ import annotations

import os

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
            fresh = keyring.encrypt(os.urandom(32))
            cur.execute(sql.INSERT_SECRET, (name, keyring.primary_id, fresh))
            cur.execute(sql.SELECT_SECRET, (name,))
            row = cur.fetchone()
        assert row is not None
        return keyring.decrypt(row[0], what=f"the {name} secret")
