-- LISTEN/NOTIFY channels belong to the database, not to a schema: two
-- deployments in two schemas of one database heard each other's changes and
-- dropped caches for nothing. The payload now says whose table changed:
-- '<schema>:<community id>', or '<schema>:*' when every community changed
-- (TRUNCATE). A listener ignores other schemas' notifications. A payload
-- without a schema (a replica of the previous version still sending) is taken
-- for one of ours, as before.
create or replace function ai_module_config_notify() returns trigger
language plpgsql as $$
declare
    scope text := tg_table_schema || ':';
begin
    if tg_level = 'STATEMENT' then
        perform pg_notify('ai_module_config', scope || '*');
    elsif tg_op = 'DELETE' then
        perform pg_notify('ai_module_config', scope || old.community_id);
    else
        perform pg_notify('ai_module_config', scope || new.community_id);
        if tg_op = 'UPDATE' and old.community_id <> new.community_id then
            perform pg_notify('ai_module_config', scope || old.community_id);
        end if;
    end if;
    return null;
end
$$;
