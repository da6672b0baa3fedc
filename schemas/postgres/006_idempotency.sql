-- Idempotency claims of the gateway: which message id a client message id was given, so that a
-- retry yields the same message whatever crashed or timed out (ingest/idempotency.py).
-- claim_key   = sha256(chat id \0 sender \0 client message id): no chat, user or client id here.
-- fingerprint = HMAC-SHA256 of the text under a server key (never a plain hash of the text).
-- sent_at     = the record's sent_at, so that a re-publish is byte-for-byte the same record.
-- acknowledged: Kafka acknowledged the message (a retry then publishes nothing).
-- Rows older than the idempotency window (24 h) are purged by the gateway, about once a minute.
CREATE TABLE message_claims (
    claim_key    bytea PRIMARY KEY,
    message_id   bigint NOT NULL,
    fingerprint  bytea NOT NULL,
    sent_at      timestamptz NOT NULL,
    acknowledged boolean NOT NULL DEFAULT false,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX message_claims_created_at ON message_claims (created_at);
