"""Chat data keys (DEKs): the KMS port, the version history, caching and rotation."""
