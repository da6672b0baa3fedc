"""The reader: history pages, single messages and search (one chat, or every chat of the
caller), decrypted on demand.

It fetches sealed envelopes from Cassandra, the chat DEK of each row's version from the key
service, opens them in memory and answers participants only. Search asks OpenSearch for message
ids (the index cannot hand back text), decrypts those messages from Cassandra, and checks
phrases and computes highlights on the decrypted text (reader/search.py, docs/search.md).
"""
