-- Rotation by usage: how many messages each DEK version has sealed (counted by the encryptors
-- after each written batch; a redelivered batch may count twice, which only rotates earlier).
ALTER TABLE chat_deks ADD COLUMN messages_sealed bigint NOT NULL DEFAULT 0;

-- History re-encryption is an audited key operation too.
ALTER TABLE key_audit DROP CONSTRAINT key_audit_action_check;
ALTER TABLE key_audit ADD CONSTRAINT key_audit_action_check CHECK (action IN (
    'dek_created', 'dek_unwrapped', 'dek_rotated', 'dek_rewrapped',
    'chat_shredded', 'retention', 'history_reencrypted'));
