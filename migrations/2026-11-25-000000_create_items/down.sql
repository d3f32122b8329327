DROP TRIGGER IF EXISTS items_bump_version ON items;
DROP FUNCTION IF EXISTS items_bump_version();
DROP TABLE IF EXISTS items;
