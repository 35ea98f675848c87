"""Every SQL statement the service runs, named after what it does.

Statements are plain text with psycopg placeholders; values are always passed
as parameters. Schema changes live in `migrations/*.sql`.
"""

from __future__ import annotations

from typing import LiteralString

# -- schema migrations ---------------------------------------------------------

MIGRATION_LOCK_ID = 7_461_001  # pg_advisory_xact_lock key serializing init-db runs
AUDIT_LOCK_ID = 7_461_002  # serializes audit-chain appends until commit

LOCK_MIGRATIONS: LiteralString = "SELECT pg_advisory_xact_lock(%s)"
CREATE_MIGRATIONS_TABLE: LiteralString = """
    CREATE TABLE IF NOT EXISTS schema_migrations (
        version integer PRIMARY KEY,
        name text NOT NULL,
        applied_at timestamptz NOT NULL DEFAULT now()
    )"""
SELECT_APPLIED_MIGRATIONS: LiteralString = "SELECT version FROM schema_migrations ORDER BY version"
INSERT_MIGRATION: LiteralString = "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)"
TABLE_EXISTS: LiteralString = "SELECT to_regclass(%s) IS NOT NULL"
COUNT_LEGACY_ROWS: LiteralString = "SELECT count(*) FROM patient_records WHERE meta IS NULL"
COUNT_ALL_ROWS: LiteralString = "SELECT count(*) FROM patient_records"
SCHEMA_VERSION: LiteralString = "SELECT coalesce(max(version), 0) FROM schema_migrations"

# -- application secrets (HMAC keys) ------------------------------------------

SELECT_SECRET: LiteralString = "SELECT token FROM app_secrets WHERE name = %s"
INSERT_SECRET: LiteralString = """
    INSERT INTO app_secrets (name, key_id, token) VALUES (%s, %s, %s)
    ON CONFLICT (name) DO NOTHING"""

# -- writing records -----------------------------------------------------------

RESERVE_RECORD_IDS: LiteralString = (
    "SELECT nextval(pg_get_serial_sequence('patient_records', 'id')) FROM generate_series(1, %s)"
)

# A record with at most one chunk, in one statement. ON CONFLICT skips a file
# whose keyed fingerprint is already stored for this user (import de-duplication);
# the chunk is inserted only when the record was.
INSERT_RECORD: LiteralString = """
    INSERT INTO patient_records
        (id, username, meta, key_id, file_size, chunk_count, fingerprint, dedupe_key)
    VALUES (%(id)s, %(username)s, %(meta)s, %(key_id)s, %(file_size)s, %(chunk_count)s,
            %(fingerprint)s, %(dedupe_key)s)
    ON CONFLICT (username, dedupe_key) DO NOTHING
    RETURNING id, created_at"""
INSERT_RECORD_WITH_CHUNK: LiteralString = """
    WITH r AS (
        INSERT INTO patient_records
            (id, username, meta, key_id, file_size, chunk_count, fingerprint, dedupe_key)
        VALUES (%(id)s, %(username)s, %(meta)s, %(key_id)s, %(file_size)s, 1,
                %(fingerprint)s, %(dedupe_key)s)
        ON CONFLICT (username, dedupe_key) DO NOTHING
        RETURNING username, id, created_at
    ), c AS (
        INSERT INTO record_chunks (username, record_id, seq, key_id, token)
        SELECT username, id, 0, %(key_id)s, %(chunk)s FROM r
    )
    SELECT id, created_at FROM r"""

# Large files: the record row first, then its chunks by COPY, then the final metadata.
INSERT_RECORD_PROVISIONAL: LiteralString = """
    INSERT INTO patient_records (id, username, meta, key_id)
    VALUES (%s, %s, %s, %s)
    RETURNING created_at"""
COPY_CHUNKS: LiteralString = (
    "COPY record_chunks (username, record_id, seq, key_id, token) FROM STDIN (FORMAT BINARY)"
)
CHUNK_COPY_TYPES = ["varchar", "int8", "int4", "text", "bytea"]
FINISH_RECORD: LiteralString = """
    UPDATE patient_records
       SET meta = %(meta)s, file_size = %(file_size)s, chunk_count = %(chunk_count)s,
           fingerprint = %(fingerprint)s, dedupe_key = %(dedupe_key)s
     WHERE username = %(username)s AND id = %(id)s"""

# -- reading records -----------------------------------------------------------

# Never reads file contents: octet_length of a TOASTed value comes from its header.
LIST_RECORDS: LiteralString = """
    SELECT id, username, created_at, meta, file_size,
           record_name, record_data, file_type,
           file_data IS NOT NULL AS legacy_has_file, octet_length(file_data) AS legacy_size
      FROM patient_records
     WHERE (%(username)s::text IS NULL OR username = %(username)s::text)
       AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s::timestamptz)
       AND (%(until)s::timestamptz IS NULL OR created_at < %(until)s::timestamptz)
     ORDER BY created_at DESC NULLS LAST, id DESC
     LIMIT %(limit)s"""

SELECT_RECORD_FOR_EXPORT: LiteralString = """
    SELECT id, username, meta, file_size, chunk_count,
           record_name, file_type, file_data IS NOT NULL AS legacy_has_file
      FROM patient_records
     WHERE id = %s"""
SELECT_LEGACY_FILE: LiteralString = (
    "SELECT file_data FROM patient_records WHERE username = %s AND id = %s"
)
COPY_CHUNKS_OUT: LiteralString = """
    COPY (SELECT seq, token FROM record_chunks
           WHERE username = %s AND record_id = %s ORDER BY seq)
    TO STDOUT (FORMAT BINARY)"""
CHUNK_OUT_TYPES = ["int4", "bytea"]

# -- fingerprints (import de-duplication) -------------------------------------

SELECT_FINGERPRINTED_SIZES: LiteralString = """
    SELECT DISTINCT file_size FROM patient_records
     WHERE username = %s AND fingerprint IS NOT NULL"""
FINGERPRINT_EXISTS: LiteralString = """
    SELECT EXISTS (SELECT 1 FROM patient_records WHERE username = %s AND fingerprint = %s)"""

# -- audit trail -------------------------------------------------------------

LOCK_AUDIT_CHAIN: LiteralString = "SELECT pg_advisory_xact_lock(%s)"
SELECT_AUDIT_TAIL: LiteralString = """
    SELECT (SELECT hash FROM audit_log ORDER BY id DESC LIMIT 1),
           nextval('audit_log_id_seq'), clock_timestamp()"""
INSERT_AUDIT_EVENT: LiteralString = """
    INSERT INTO audit_log (id, at, action, outcome, os_user, db_role, actor,
                           usernames, record_ids, details, prev_hash, hash)
    VALUES (%(id)s, %(at)s, %(action)s, %(outcome)s, %(os_user)s, %(db_role)s, %(actor)s,
            %(usernames)s, %(record_ids)s, %(details)s, %(prev_hash)s, %(hash)s)"""

# -- import (issue 3): statements used only by `import` go below ----------------

# -- rotation, verification, audit reading, status (issue 4) go below ----------
