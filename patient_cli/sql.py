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
SELECT_SECRETS: LiteralString = "SELECT name, token FROM app_secrets WHERE name = ANY(%s)"
INSERT_SECRET: LiteralString = """
    INSERT INTO app_secrets (name, key_id, token) VALUES (%s, %s, %s)
    ON CONFLICT (name) DO NOTHING"""
# One stored token (new or legacy), to prove a key reads the existing data before
# any secret is created under it.
SELECT_ANY_RECORD_TOKEN: LiteralString = """
    SELECT id, meta, record_data FROM patient_records
     WHERE meta IS NOT NULL OR record_data IS NOT NULL
     LIMIT 1"""

# -- writing records -----------------------------------------------------------

# The sequence is looked up once (a materialized CTE), not once per id: as the
# argument of nextval, the lookup ran per row and took 9 µs an id here.
RESERVE_RECORD_IDS: LiteralString = """
    WITH s AS MATERIALIZED (
        SELECT pg_get_serial_sequence('patient_records', 'id')::regclass AS seq
    )
    SELECT nextval(s.seq) FROM s, generate_series(1, %s)"""

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
INSERT_CHUNK: LiteralString = """
    INSERT INTO record_chunks (username, record_id, seq, key_id, token)
    VALUES (%s, %s, %s, %s, %b)"""
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
            %(usernames)s, %(record_ids)s::bigint[], %(details)s, %(prev_hash)s, %(hash)s)"""

# -- import (issue 3): statements used only by `import` go below ----------------

# Many small records at once (import's fast path, store.copy_rows; the rows are
# copyformat's, in the same column order): no ON CONFLICT here, so a duplicate
# dedupe key fails the whole COPY with a unique violation and the importer
# retries that batch with INSERT_RECORD*.
COPY_RECORDS: LiteralString = """
    COPY patient_records
        (id, username, meta, key_id, file_size, chunk_count, fingerprint, dedupe_key)
    FROM STDIN (FORMAT BINARY)"""
# created_at defaults to now(): the transaction's start, the same for every row in it.
TRANSACTION_TIME: LiteralString = "SELECT now()"
# Which of these fingerprints are stored for the user (one query for many files).
STORED_FINGERPRINTS: LiteralString = """
    SELECT fingerprint FROM patient_records
     WHERE username = %s AND fingerprint = ANY(%s)"""

# -- rotation, verification, audit reading, status (issue 4) go below ----------

# Which key protects how much (status, rotate-key's plan and its dry run). Legacy
# rows have no key id: their record_data token predates key ids.
KEY_USAGE_SECRETS: LiteralString = """
    SELECT key_id, count(*), 0::bigint FROM app_secrets GROUP BY key_id"""
KEY_USAGE_RECORDS: LiteralString = """
    SELECT key_id, count(*), coalesce(sum(octet_length(meta)), 0)::bigint
      FROM patient_records WHERE meta IS NOT NULL GROUP BY key_id"""
KEY_USAGE_CHUNKS: LiteralString = """
    SELECT key_id, count(*), coalesce(sum(octet_length(token)), 0)::bigint
      FROM record_chunks GROUP BY key_id"""
LEGACY_USAGE: LiteralString = """
    SELECT count(*), coalesce(sum(octet_length(file_data)), 0)::bigint
      FROM patient_records WHERE meta IS NULL"""

# Rotation finds work without locking, walking the primary key from where the
# previous batch ended; it then locks just those rows, one username per
# statement, skipping rows another transaction holds (a rerun picks them up).
SELECT_SECRETS_TO_ROTATE: LiteralString = """
    SELECT name, token FROM app_secrets WHERE key_id <> %s
     ORDER BY name FOR NO KEY UPDATE SKIP LOCKED"""
UPDATE_SECRET_TOKEN: LiteralString = """
    UPDATE app_secrets SET token = %s, key_id = %s WHERE name = %s"""

SELECT_RECORDS_TO_ROTATE: LiteralString = """
    SELECT username, id, octet_length(meta) FROM patient_records
     WHERE (username, id) > (%(username)s::text, %(id)s::bigint)
       AND meta IS NOT NULL AND key_id IS DISTINCT FROM %(primary)s
     ORDER BY username, id
     LIMIT %(limit)s"""
LOCK_RECORDS_TO_ROTATE: LiteralString = """
    SELECT id, meta FROM patient_records
     WHERE username = %(username)s AND id = ANY(%(ids)s)
       AND meta IS NOT NULL AND key_id IS DISTINCT FROM %(primary)s
     ORDER BY id
       FOR NO KEY UPDATE SKIP LOCKED"""
UPDATE_RECORD_META_TOKEN: LiteralString = """
    UPDATE patient_records SET meta = %s, key_id = %s WHERE username = %s AND id = %s"""

# `mod(record_id + seq, slices) = slice` splits the chunks (even of one file)
# between parallel workers.
SELECT_CHUNKS_TO_ROTATE: LiteralString = """
    SELECT username, record_id, seq, octet_length(token) FROM record_chunks
     WHERE (username, record_id, seq) > (%(username)s::text, %(record_id)s::bigint, %(seq)s::int)
       AND key_id <> %(primary)s
       AND mod(record_id + seq, %(slices)s::bigint) = %(slice)s::bigint
     ORDER BY username, record_id, seq
     LIMIT %(limit)s"""
LOCK_CHUNKS_TO_ROTATE: LiteralString = """
    SELECT c.record_id, c.seq, c.token
      FROM record_chunks c
      JOIN unnest(%(record_ids)s::bigint[], %(seqs)s::int[]) AS k (record_id, seq)
        ON c.record_id = k.record_id AND c.seq = k.seq
     WHERE c.username = %(username)s AND c.key_id <> %(primary)s
     ORDER BY c.record_id, c.seq
       FOR NO KEY UPDATE OF c SKIP LOCKED"""
UPDATE_CHUNK_TOKEN: LiteralString = """
    UPDATE record_chunks SET token = %s, key_id = %s
     WHERE username = %s AND record_id = %s AND seq = %s"""

SELECT_LEGACY_TO_CONVERT: LiteralString = """
    SELECT username, id, coalesce(octet_length(file_data), 0) FROM patient_records
     WHERE (username, id) > (%(username)s::text, %(id)s::bigint) AND meta IS NULL
     ORDER BY username, id
     LIMIT %(limit)s"""
LOCK_LEGACY_RECORD: LiteralString = """
    SELECT record_name, record_data, file_data, file_type FROM patient_records
     WHERE username = %s AND id = %s AND meta IS NULL
       FOR NO KEY UPDATE SKIP LOCKED"""
CONVERT_LEGACY_RECORD: LiteralString = """
    UPDATE patient_records
       SET meta = %(meta)s, key_id = %(key_id)s, file_size = %(file_size)s,
           chunk_count = %(chunk_count)s, fingerprint = %(fingerprint)s,
           record_name = NULL, record_data = NULL, file_data = NULL, file_type = NULL
     WHERE username = %(username)s AND id = %(id)s"""

# Verification reads a page of records at a time, in primary-key order.
SET_REPEATABLE_READ: LiteralString = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"
SELECT_RECORDS_TO_VERIFY: LiteralString = """
    SELECT id, username, meta, file_size, chunk_count,
           record_data, file_data IS NOT NULL, octet_length(file_data)
      FROM patient_records
     WHERE (username, id) > (%(after_username)s::text, %(after_id)s::bigint)
       AND (%(username)s::text IS NULL OR username = %(username)s::text)
       AND (%(record_id)s::bigint IS NULL OR id = %(record_id)s::bigint)
     ORDER BY username, id
     LIMIT %(limit)s"""
RECORD_EXISTS: LiteralString = "SELECT EXISTS (SELECT 1 FROM patient_records WHERE id = %s)"
COUNT_RECORDS_TO_VERIFY: LiteralString = """
    SELECT count(*),
           (coalesce(sum(file_size), 0) + coalesce(sum(octet_length(file_data)), 0))::bigint
      FROM patient_records
     WHERE (%(username)s::text IS NULL OR username = %(username)s::text)
       AND (%(record_id)s::bigint IS NULL OR id = %(record_id)s::bigint)"""

# Reading the audit trail: newest first for people, oldest first for the chain.
SELECT_AUDIT_EVENTS: LiteralString = """
    SELECT id, at, action, outcome, os_user, db_role, actor, usernames, record_ids,
           details, prev_hash, hash
      FROM audit_log
     WHERE (%(username)s::text IS NULL OR usernames @> ARRAY[%(username)s::text])
       AND (%(action)s::text IS NULL OR action = %(action)s::text)
       AND (%(since)s::timestamptz IS NULL OR at >= %(since)s::timestamptz)
     ORDER BY id DESC
     LIMIT %(limit)s"""
SELECT_AUDIT_CHAIN_PAGE: LiteralString = """
    SELECT id, at, action, outcome, os_user, db_role, actor, usernames, record_ids,
           details, prev_hash, hash
      FROM audit_log
     WHERE id > %s
     ORDER BY id
     LIMIT %s"""
