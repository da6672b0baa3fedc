-- Chat metadata and chat DEK history (seed, section 3), plus what operations need.
-- Applied by `sealstream migrate` inside the configured schema (search_path).

CREATE TABLE tenants (
    tenant_id     text PRIMARY KEY,
    kms_key_name  text NOT NULL,             -- Transit key (CMK) that wraps this tenant's DEKs
    kms_address   text,                      -- NULL: the default KMS of the settings
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE chats (
    chat_id       uuid PRIMARY KEY,
    tenant_id     text NOT NULL REFERENCES tenants (tenant_id),
    participants  text[] NOT NULL CHECK (cardinality(participants) BETWEEN 1 AND 1000),
    state         text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'deleted')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE chat_deks (
    id             bigserial PRIMARY KEY,
    chat_id        uuid NOT NULL REFERENCES chats (chat_id),
    dek_version    integer NOT NULL CHECK (dek_version >= 1),
    encrypted_dek  text,                     -- Transit ciphertext; NULL once destroyed
    kms_key_name   text NOT NULL,
    state          text NOT NULL CHECK (state IN ('active', 'retired', 'destroyed')),
    valid_from     timestamptz NOT NULL DEFAULT now(),
    valid_to       timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    destroyed_at   timestamptz,
    UNIQUE (chat_id, dek_version),
    -- A destroyed version keeps no wrapped key; a live one always has one.
    CHECK ((state = 'destroyed') = (encrypted_dek IS NULL))
);

-- The database, not the code, guarantees one active DEK version per chat.
CREATE UNIQUE INDEX chat_deks_one_active ON chat_deks (chat_id) WHERE state = 'active';
