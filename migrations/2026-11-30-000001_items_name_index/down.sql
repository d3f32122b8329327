DROP INDEX items_name_id;
