"""`sealstream migrate`: applies every schema the pipeline needs, idempotently.

Postgres (versioned SQL files), Cassandra (keyspace + tables), the OpenSearch index with its
mapping, the Kafka topics and their ACLs, the default tenant's Transit master key, and the object
store's attachments bucket. Topic configs and the
index's dynamic durability settings are re-applied on every run, so an existing deployment gets
them too.
"""

from __future__ import annotations

from sealstream.adapters.cassandra import MessageStore
from sealstream.adapters.kafka import apply_acls, ensure_topics
from sealstream.adapters.object_store import ObjectStore
from sealstream.adapters.opensearch import SearchIndex
from sealstream.adapters.postgres import ChatKeyRepository, Database
from sealstream.adapters.vault import TransitKms
from sealstream.settings import Settings


def migrate_all(settings: Settings) -> dict[str, object]:
    report: dict[str, object] = {}
    db = Database(settings.postgres)
    db.open()
    try:
        report["postgres"] = db.migrate() or "up to date"
        kms = TransitKms(settings.vault)
        kms.ensure_key(settings.vault.default_key)
        ChatKeyRepository(db).upsert_tenant(
            settings.keys.default_tenant, settings.vault.default_key
        )
        report["vault"] = f"transit key {settings.vault.default_key}"
    finally:
        db.close()
    store = MessageStore(settings.cassandra)
    store.connect()
    try:
        store.migrate()
        report["cassandra"] = f"keyspace {settings.cassandra.keyspace}"
    finally:
        store.close()
    index = SearchIndex(settings.opensearch)
    try:
        index.migrate()
        report["opensearch"] = f"index {index.index}"
    finally:
        index.close()
    created = ensure_topics(settings.kafka)
    # Retention, segment roll and durability are (re)applied to existing topics as well.
    report["kafka"] = f"created {created}" if created else "topics exist, configs applied"
    # As the admin principal (a super user): each service's rights on these topics and groups.
    if settings.kafka.security_protocol != "PLAINTEXT":
        report["kafka acls"] = f"{apply_acls(settings.kafka)} bindings (docs/operations.md)"
    objects = ObjectStore(settings.object_store)
    try:
        # The attachments bucket, and a lifecycle rule for abandoned multipart uploads where the
        # store has lifecycle rules (S3Proxy has none: `sealstream attachments sweep-uploads`).
        report["objects"] = objects.ensure_bucket()
    finally:
        objects.close()
    return report
