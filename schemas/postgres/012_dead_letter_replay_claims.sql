-- A replay in progress: the letter is claimed here (own transaction) before it is published, and
-- the claim is removed in the transaction that records the replay (or when the publish failed).
-- Two operators (the CLI and the admin API, two admin processes) replaying the same letter at
-- once: the second sees the claim and skips the letter, instead of publishing it again. A claim
-- left by a process that died mid-replay is taken over once it is older than the replay's
-- bound (sealstream.dead_letters.CLAIM_STALE_SECONDS). Coordinates, actor and time only.
CREATE TABLE dead_letter_replay_claims (
    dlq_topic     text        NOT NULL,
    dlq_partition integer     NOT NULL,
    dlq_offset    bigint      NOT NULL,
    claim         uuid        NOT NULL,  -- this claim's token: only its holder removes it
    claimed_by    text        NOT NULL,
    claimed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dlq_topic, dlq_partition, dlq_offset)
);
