"""The reader: history pages, single messages and search over a chat, decrypted on demand.

It fetches sealed envelopes from Cassandra, the chat DEK of each row's version from the key
service, opens them in memory and answers participants only. Search asks OpenSearch for message
ids (the index cannot hand back text) and decrypts those messages from Cassandra.
"""
