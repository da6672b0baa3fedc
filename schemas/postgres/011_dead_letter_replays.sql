-- Dead letters replayed by an operator (`sealstream dlq replay`, `POST /v1/dead-letters/replay`):
-- one row per letter, keyed by its coordinates in the dead-letter topic, so a letter is not
-- republished twice unless the operator forces it. Written after the broker acknowledged the
-- replayed record, in the transaction of its audit row. No message text, no key, no value here:
-- coordinates, the actor and times only.
CREATE TABLE dead_letter_replays (
    dlq_topic        text    NOT NULL,
    dlq_partition    integer NOT NULL,
    dlq_offset       bigint  NOT NULL,
    origin_topic     text    NOT NULL,  -- where it was republished (its `dlq.topic`)
    origin_partition integer NOT NULL,  -- where the record was read from before it failed
    origin_offset    bigint  NOT NULL,
    replayed_partition integer NOT NULL,  -- where the last replay landed
    replayed_offset  bigint  NOT NULL,
    first_replayed_at timestamptz NOT NULL DEFAULT now(),
    first_replayed_by text   NOT NULL,
    last_replayed_at timestamptz NOT NULL DEFAULT now(),
    last_replayed_by text    NOT NULL,
    replays          integer NOT NULL DEFAULT 1 CHECK (replays >= 1),
    PRIMARY KEY (dlq_topic, dlq_partition, dlq_offset)
);

-- A replay is an operator's action on data: audited like the key and membership changes.
ALTER TABLE key_audit DROP CONSTRAINT key_audit_action_check;
ALTER TABLE key_audit ADD CONSTRAINT key_audit_action_check CHECK (action IN (
    'dek_created', 'dek_unwrapped', 'dek_rotated', 'dek_rewrapped',
    'chat_shredded', 'retention', 'history_reencrypted',
    'tenant_key_set', 'retention_set',
    'blind_index_enabled', 'index_key_rotated', 'index_key_unwrapped', 'index_key_destroyed',
    'participant_added', 'participant_removed',
    'dead_letter_replayed'));
