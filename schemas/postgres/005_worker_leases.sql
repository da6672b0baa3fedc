-- Snowflake worker ids leased to the processes that make message ids (gateways, direct Kafka
-- producers), so that no two of them ever share one (docs/operations.md, "Message ids across
-- processes"). One row per worker id, made here once; a process takes a row whose lease expired,
-- renews it every few seconds and frees it when it stops. Times are the database's clock.

CREATE TABLE worker_leases (
    worker_id    integer PRIMARY KEY CHECK (worker_id BETWEEN 0 AND 1023),
    holder       uuid,                       -- random per process; NULL: free
    host         text NOT NULL DEFAULT '',   -- for operators: who holds it
    pid          integer,
    service      text NOT NULL DEFAULT '',
    acquired_at  timestamptz,
    expires_at   timestamptz NOT NULL DEFAULT '-infinity',
    -- Fence (Unix ms): no id made with this worker id by any past or present holder has a
    -- timestamp above it. A holder raises it *before* it may use a later millisecond (it is set
    -- in the same statement that renews the lease); a new holder waits until its clock is past it.
    last_ms      bigint NOT NULL DEFAULT 0
);

INSERT INTO worker_leases (worker_id) SELECT g FROM generate_series(0, 1023) AS g;
