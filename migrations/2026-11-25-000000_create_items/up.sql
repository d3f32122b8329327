-- Items: the source of truth behind the cache.
CREATE TABLE items (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        TEXT        NOT NULL,
    description TEXT        NOT NULL DEFAULT '',
    price_cents BIGINT      NOT NULL DEFAULT 0,
    version     BIGINT      NOT NULL DEFAULT 1,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- The same rules the API checks, so no other writer can store what the API would refuse.
    CONSTRAINT items_name_length CHECK (char_length(name) BETWEEN 1 AND 200),
    CONSTRAINT items_name_not_blank CHECK (btrim(name) <> ''),
    CONSTRAINT items_description_length CHECK (char_length(description) <= 10000),
    CONSTRAINT items_price_not_negative CHECK (price_cents >= 0),
    CONSTRAINT items_version_positive CHECK (version >= 1)
);

-- `version` is the cache's notion of "newer": it must grow on every update, whoever writes,
-- so the database maintains it rather than trusting each UPDATE statement to remember.
CREATE FUNCTION items_bump_version() RETURNS trigger AS $$
BEGIN
    NEW.version := OLD.version + 1;
    NEW.updated_at := clock_timestamp();
    NEW.created_at := OLD.created_at;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER items_bump_version
    BEFORE UPDATE ON items
    FOR EACH ROW EXECUTE FUNCTION items_bump_version();
