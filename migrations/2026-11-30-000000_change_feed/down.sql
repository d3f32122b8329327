DROP TRIGGER items_record_truncates ON items;
DROP TRIGGER items_record_deletes ON items;
DROP TRIGGER items_record_updates ON items;
DROP TRIGGER items_record_inserts ON items;
DROP FUNCTION items_record_changes();
DROP TABLE item_changes;
