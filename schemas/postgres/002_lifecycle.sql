-- Key lifecycle: an append-only audit trail of every key operation (no key material in it).

CREATE TABLE key_audit (
    id           bigserial PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT now(),
    actor        text NOT NULL,          -- who or what asked: a user, an operator, a service
    action       text NOT NULL CHECK (action IN (
                     'dek_created', 'dek_unwrapped', 'dek_rotated', 'dek_rewrapped',
                     'chat_shredded', 'retention')),
    chat_id      uuid,
    dek_version  integer,
    reason       text NOT NULL DEFAULT ''
);
CREATE INDEX key_audit_by_chat ON key_audit (chat_id, at);

CREATE FUNCTION key_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'key_audit is append-only';
END
$$;

CREATE TRIGGER key_audit_append_only
    BEFORE UPDATE OR DELETE ON key_audit
    FOR EACH ROW EXECUTE FUNCTION key_audit_append_only();
