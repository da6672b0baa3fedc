"""The encryptor: consumes the message topic, seals each message with its chat's current DEK and
writes the envelope + DEK version to Cassandra. Consumer group `sealstream-encryptor`."""
