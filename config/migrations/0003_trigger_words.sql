-- A community's own greeting and farewell words (NULL: the built-in lists of
-- consumers/triggers.py, in English, Spanish, Portuguese, French, German and
-- Italian). A list replaces the built-in one; a leading '^' means "only as
-- the first word of a line".
alter table ai_module_config
    add column if not exists greeting_words text[]
        constraint ai_module_config_greeting_words_size
        check (cardinality(greeting_words) <= 500
               and array_position(greeting_words, null) is null),
    add column if not exists farewell_words text[]
        constraint ai_module_config_farewell_words_size
        check (cardinality(farewell_words) <= 500
               and array_position(farewell_words, null) is null);
