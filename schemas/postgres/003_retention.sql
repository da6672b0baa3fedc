-- Retention: how long messages are kept, per tenant with an optional per-chat override.
-- NULL means "keep forever".
ALTER TABLE tenants ADD COLUMN retention_days integer CHECK (retention_days > 0);
ALTER TABLE chats ADD COLUMN retention_days integer CHECK (retention_days > 0);
