"""The key-lifecycle admin API: every `sealstream keys ...` operation over authenticated HTTP."""
