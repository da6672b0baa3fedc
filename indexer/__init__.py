"""The indexer: consumes the message topic and bulk-indexes each message's tokens into OpenSearch
(text searchable, not retrievable). Consumer group `sealstream-indexer`, independent of the
encryptor."""
