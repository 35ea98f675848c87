-- Encrypted records with streamed file chunks, ready to distribute by username.
--
-- Rows written by the original service (legacy rows) keep their columns
-- record_name, record_data (a Fernet token as text), file_data (plaintext) and
-- file_type; `meta IS NULL` marks them. `rotate-key` converts them. New rows
-- leave those columns NULL and keep everything in `meta` (one Fernet token
-- over JSON: name, data, MIME type, file name, size, SHA-256) and in
-- record_chunks (one Fernet token per 1 MiB piece of the file).

-- ids become bigint; the sequence continues after the old ids.
ALTER TABLE patient_records ALTER COLUMN id TYPE bigint;
DO $$
DECLARE
    seq text := pg_get_serial_sequence('patient_records', 'id');
    pk text;
    top bigint;
BEGIN
    EXECUTE format('ALTER SEQUENCE %s AS bigint', seq);
    -- Rows loaded with explicit ids (a restore, a hand-made INSERT) may have left
    -- the sequence behind them: new ids must continue after every old one.
    SELECT max(id) INTO top FROM patient_records;
    IF top IS NOT NULL THEN
        EXECUTE format('SELECT setval(%L, greatest(%s, (SELECT last_value FROM %s)))',
                       seq, top, seq);
    END IF;
    -- Distributable by username: the primary key must include it.
    SELECT conname INTO pk FROM pg_constraint
     WHERE conrelid = 'patient_records'::regclass AND contype = 'p';
    IF pk IS NOT NULL THEN
        EXECUTE format('ALTER TABLE patient_records DROP CONSTRAINT %I', pk);
    END IF;
END
$$;
ALTER TABLE patient_records ADD CONSTRAINT patient_records_pkey PRIMARY KEY (username, id);

-- Seed timestamps were naive; they were written in UTC.
ALTER TABLE patient_records
    ALTER COLUMN created_at TYPE timestamptz USING created_at AT TIME ZONE 'UTC';
ALTER TABLE patient_records ALTER COLUMN created_at SET DEFAULT now();
ALTER TABLE patient_records ALTER COLUMN record_name DROP NOT NULL;

ALTER TABLE patient_records
    ADD COLUMN meta bytea,
    ADD COLUMN key_id text,
    ADD COLUMN file_size bigint,
    ADD COLUMN chunk_count integer,
    ADD COLUMN fingerprint bytea,
    ADD COLUMN dedupe_key bytea;

-- Tokens are incompressible: do not let TOAST try.
ALTER TABLE patient_records ALTER COLUMN meta SET STORAGE EXTERNAL;

-- Import de-duplication, enforced by the database (NULLs never conflict).
ALTER TABLE patient_records
    ADD CONSTRAINT patient_records_dedupe UNIQUE (username, dedupe_key);

CREATE INDEX patient_records_user_newest
    ON patient_records (username, created_at DESC, id DESC);
CREATE INDEX patient_records_newest ON patient_records (created_at DESC, id DESC);
CREATE INDEX patient_records_user_fingerprint
    ON patient_records (username, fingerprint) WHERE fingerprint IS NOT NULL;
CREATE INDEX patient_records_id ON patient_records (id);

CREATE TABLE record_chunks (
    username varchar(80) NOT NULL,
    record_id bigint NOT NULL,
    seq integer NOT NULL,
    key_id text NOT NULL,
    token bytea NOT NULL,
    PRIMARY KEY (username, record_id, seq),
    FOREIGN KEY (username, record_id)
        REFERENCES patient_records (username, id) ON DELETE CASCADE
);
ALTER TABLE record_chunks ALTER COLUMN token SET STORAGE EXTERNAL;

-- Application secrets (HMAC keys for import fingerprints and the audit chain),
-- each stored encrypted under the current Fernet key and re-encrypted by
-- rotate-key, so they outlive any one Fernet key.
CREATE TABLE app_secrets (
    name text PRIMARY KEY,
    key_id text NOT NULL,
    token bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
