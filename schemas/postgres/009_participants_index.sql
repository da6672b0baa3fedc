-- Search across a user's chats (issue 12): the reader reads the chats a user belongs to on every
-- search (`participants @> ARRAY[user]`), which this GIN index answers without a scan of `chats`.
CREATE INDEX IF NOT EXISTS chats_participants ON chats USING gin (participants);
