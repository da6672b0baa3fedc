-- Tenant-level key decisions are audited too: which master key wraps a tenant's DEKs, and after
-- how many days a tenant's or chat's messages expire (retention decides when DEK versions are
-- destroyed). Tenant rows have no chat id; the tenant is named in `reason`.
ALTER TABLE key_audit DROP CONSTRAINT key_audit_action_check;
ALTER TABLE key_audit ADD CONSTRAINT key_audit_action_check CHECK (action IN (
    'dek_created', 'dek_unwrapped', 'dek_rotated', 'dek_rewrapped',
    'chat_shredded', 'retention', 'history_reencrypted',
    'tenant_key_set', 'retention_set'));
