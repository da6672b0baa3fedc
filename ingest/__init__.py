"""The ingest gateway: authenticated HTTP/WebSocket API that accepts chat messages and publishes
them to the Kafka message topic, answering only after Kafka acknowledged them."""
