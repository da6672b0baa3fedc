"""The ingest gateway: the authenticated HTTPS/WSS API where chat messages enter Sealstream.

It owns chat creation (participants, first DEK via the key service), the participant check,
message validation, Snowflake id assignment, client-id idempotency (Redis) and publishing the
plaintext `MessageRecord`s to the Kafka message topic, answering `202` only after Kafka's acks=all
acknowledgement. `service` holds the logic over the `ports`; `api` is the FastAPI layer;
`idempotency` the Redis adapter; `wiring` builds it all from settings and runs it.
"""
