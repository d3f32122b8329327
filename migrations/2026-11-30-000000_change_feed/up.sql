-- The change feed: every committed change to `items`, whoever made it (the API, psql,
-- another program, a migration), recorded in the same transaction, so the service can
-- invalidate the cache for writes it did not make (see docs/cache-design.md, "The change
-- feed"). The table is the durable record; the NOTIFY only wakes the service.
CREATE TABLE item_changes (
    seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- NULL for a TRUNCATE, which changes every row.
    item_id    BIGINT,
    -- 'I'nsert, 'U'pdate, 'D'elete, 'T'runcate.
    op         CHAR(1)     NOT NULL CHECK (op IN ('I', 'U', 'D', 'T')),
    -- The row's name before and after the change (lookups by name need both).
    old_name   TEXT,
    new_name   TEXT,
    -- When the change was made (the statement's clock; the commit follows within the
    -- transaction): the start of the invalidation lag.
    changed_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    -- The writing transaction. The API tags its own invalidation with it, so the service
    -- can tell a change it has invalidated already from one it has not.
    xid        BIGINT      NOT NULL DEFAULT txid_current()
);

-- Statement-level triggers with transition tables: one INSERT ... SELECT per statement, so
-- a million-row UPDATE costs one set-based insert, not a million trigger calls.
--
-- SECURITY DEFINER with the migration's search_path: a client allowed to write `items` but
-- not `item_changes`, or one with another search_path, still has its changes recorded
-- rather than its writes refused.
CREATE FUNCTION items_record_changes() RETURNS trigger
    SECURITY DEFINER
    SET search_path FROM CURRENT
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO item_changes (item_id, op, new_name)
            SELECT id, 'I', name FROM new_rows;
    ELSIF TG_OP = 'UPDATE' THEN
        -- Matched by id; an UPDATE that changes an id records both ids.
        INSERT INTO item_changes (item_id, op, old_name, new_name)
            SELECT coalesce(n.id, o.id), 'U', o.name, n.name
            FROM new_rows n FULL JOIN old_rows o ON o.id = n.id;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO item_changes (item_id, op, old_name)
            SELECT id, 'D', name FROM old_rows;
    ELSE
        INSERT INTO item_changes (item_id, op) VALUES (NULL, 'T');
    END IF;
    -- One wake-up per statement; delivered at commit, dropped on rollback.
    PERFORM pg_notify('itemcache_changes', '');
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER items_record_inserts AFTER INSERT ON items
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION items_record_changes();
CREATE TRIGGER items_record_updates AFTER UPDATE ON items
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION items_record_changes();
CREATE TRIGGER items_record_deletes AFTER DELETE ON items
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION items_record_changes();
CREATE TRIGGER items_record_truncates AFTER TRUNCATE ON items
    FOR EACH STATEMENT EXECUTE FUNCTION items_record_changes();

-- Fire under session_replication_role = replica too (logical replication's apply worker,
-- pg_restore --disable-triggers): those writes change rows the cache may hold.
ALTER TABLE items ENABLE ALWAYS TRIGGER items_record_inserts;
ALTER TABLE items ENABLE ALWAYS TRIGGER items_record_updates;
ALTER TABLE items ENABLE ALWAYS TRIGGER items_record_deletes;
ALTER TABLE items ENABLE ALWAYS TRIGGER items_record_truncates;
