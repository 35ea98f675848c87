-- Append-only, hash-chained audit trail. Not a patient-data table (it is never
-- distributed), so a trigger may guard it.
CREATE TABLE audit_log (
    id bigint PRIMARY KEY,
    at timestamptz NOT NULL,
    action text NOT NULL,
    outcome text NOT NULL,
    os_user text NOT NULL,
    db_role text NOT NULL,
    actor text,
    usernames text[] NOT NULL DEFAULT '{}',
    record_ids bigint[] NOT NULL DEFAULT '{}',
    details jsonb NOT NULL DEFAULT '{}',
    prev_hash bytea NOT NULL,
    hash bytea NOT NULL
);
CREATE SEQUENCE audit_log_id_seq AS bigint OWNED BY audit_log.id;
CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_usernames ON audit_log USING gin (usernames);

CREATE FUNCTION audit_log_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER audit_log_no_update_delete
    BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_refuse_change();
CREATE TRIGGER audit_log_no_truncate
    BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_refuse_change();
