-- Live delivery (issue 15): adding or removing a chat's participant is audited like the other
-- admin changes of a chat, in the transaction of the change (which also NOTIFYs
-- `sealstream_membership` so every delivery process re-checks its subscribers of the chat).
ALTER TABLE key_audit DROP CONSTRAINT key_audit_action_check;
ALTER TABLE key_audit ADD CONSTRAINT key_audit_action_check CHECK (action IN (
    'dek_created', 'dek_unwrapped', 'dek_rotated', 'dek_rewrapped',
    'chat_shredded', 'retention', 'history_reencrypted',
    'tenant_key_set', 'retention_set',
    'blind_index_enabled', 'index_key_rotated', 'index_key_unwrapped', 'index_key_destroyed',
    'participant_added', 'participant_removed'));
