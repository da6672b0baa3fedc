"""Every contract of Sealstream: event and API models, CQL, SQL and index mappings."""
