-- Lookups by exact name (GET /items?name=...), in id order: an index-only scan for the ids
-- of a name's first page, and the keyset pages after it.
CREATE INDEX items_name_id ON items (name, id);
