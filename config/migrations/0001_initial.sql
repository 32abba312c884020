-- Per-community settings and opt-in conversation persistence.
--
-- Every object is created unqualified, so it lands in the connection's current
-- schema (the first existing schema on search_path): one database can hold
-- several deployments (or test runs), each in its own schema.
--
-- In ai_module_config, NULL means "use the environment default". The CHECK
-- constraints repeat the application's validation so a row written by hand
-- (psql) cannot hold what the worker could not use; their names say what is
-- wrong, because that name is what an operator sees in the error.

create table ai_module_config (
    community_id            text primary key
        constraint ai_module_config_community_id_length
        check (length(community_id) between 1 and 255),
    enabled                 boolean not null default true,

    -- provider and model
    provider                text
        constraint ai_module_config_provider_known
        check (provider in ('local', 'ollama', 'waddleai')),
    fallback_providers      text[]
        constraint ai_module_config_fallback_providers_known
        check (fallback_providers <@ array['local', 'ollama', 'waddleai']::text[]),
    model                   text
        constraint ai_module_config_model_length check (length(model) between 1 and 255),
    model_by_trigger        jsonb,
    temperature             real
        constraint ai_module_config_temperature_range check (temperature between 0 and 2),
    max_tokens              integer
        constraint ai_module_config_max_tokens_range check (max_tokens between 1 and 32768),
    base_url                text
        constraint ai_module_config_base_url_http
        check (base_url ~ '^https?://[^/?#@\s]+([/?#]\S*)?$'),
    -- A Fernet token (see config/secrets.py), never the plain key.
    api_key_encrypted       text
        constraint ai_module_config_api_key_is_token
        check (api_key_encrypted ~ '^gAAAAA[A-Za-z0-9_=-]+$'),

    -- persona and output
    system_prompt           text
        constraint ai_module_config_system_prompt_length
        check (length(system_prompt) between 1 and 20000),
    bot_name                text
        constraint ai_module_config_bot_name_length check (length(bot_name) between 1 and 64),
    response_prefix         text
        constraint ai_module_config_response_prefix_length check (length(response_prefix) <= 32),
    max_reply_chars         integer
        constraint ai_module_config_max_reply_chars_range
        check (max_reply_chars between 1 and 10000),
    allow_links             boolean,
    blocked_words           text[]
        constraint ai_module_config_blocked_words_size
        check (cardinality(blocked_words) <= 1000 and array_position(blocked_words, null) is null),

    -- what is answered
    triggers                text[]
        constraint ai_module_config_triggers_known
        check (triggers <@ array['greeting', 'farewell', 'question', 'mention', 'event',
                                 'proactive']::text[]),
    event_types             text[]
        constraint ai_module_config_event_types_known
        check (event_types <@ array['subscription', 'resub', 'gift_subscription', 'follow',
                                    'donation', 'cheer', 'raid', 'boost',
                                    'member_join']::text[]),

    -- how often
    user_cooldown_s         real
        constraint ai_module_config_user_cooldown_range check (user_cooldown_s between 0 and 86400),
    channel_cooldown_s      real
        constraint ai_module_config_channel_cooldown_range
        check (channel_cooldown_s between 0 and 86400),
    user_rate_limit         integer
        constraint ai_module_config_user_rate_limit_range check (user_rate_limit between 1 and 100000),
    user_rate_window_s      integer
        constraint ai_module_config_user_rate_window_range
        check (user_rate_window_s between 1 and 86400),
    community_rate_limit    integer
        constraint ai_module_config_community_rate_limit_range
        check (community_rate_limit between 1 and 1000000),
    community_rate_window_s integer
        constraint ai_module_config_community_rate_window_range
        check (community_rate_window_s between 1 and 86400),

    -- joining conversations unprompted
    proactive_enabled       boolean not null default false,
    proactive_probability   real
        constraint ai_module_config_proactive_probability_range
        check (proactive_probability between 0 and 1),
    proactive_min_length    integer
        constraint ai_module_config_proactive_min_length_range
        check (proactive_min_length between 0 and 10000),
    proactive_rate_limit    integer
        constraint ai_module_config_proactive_rate_limit_range
        check (proactive_rate_limit between 1 and 100000),
    proactive_rate_window_s integer
        constraint ai_module_config_proactive_rate_window_range
        check (proactive_rate_window_s between 1 and 86400),

    -- privacy: conversation text is stored only when a community opts in
    persist_context         boolean not null default false,

    created_at              timestamptz not null default now(),
    updated_at              timestamptz not null default now(),

    -- A limit without its window (or the reverse) means nothing.
    constraint ai_module_config_user_rate_pair
        check ((user_rate_limit is null) = (user_rate_window_s is null)),
    constraint ai_module_config_community_rate_pair
        check ((community_rate_limit is null) = (community_rate_window_s is null)),
    constraint ai_module_config_proactive_rate_pair
        check ((proactive_rate_limit is null) = (proactive_rate_window_s is null)),
    constraint ai_module_config_fallback_not_primary
        check (provider is null or fallback_providers is null
               or not (provider = any (fallback_providers)))
);

-- model_by_trigger: {"<trigger>": "<model>", ...}. A CHECK cannot hold a
-- subquery, hence the function (immutable: it only reads its argument).
create or replace function ai_model_by_trigger_valid(value jsonb) returns boolean
language sql immutable as $$
    select jsonb_typeof(value) = 'object'
       and not exists (
           select 1 from jsonb_each(value) as entry(key, model)
           where entry.key not in ('greeting', 'farewell', 'question', 'mention', 'event',
                                   'proactive')
              or jsonb_typeof(entry.model) <> 'string'
              or length(entry.model #>> '{}') not between 1 and 255
       )
$$;

alter table ai_module_config
    add constraint ai_module_config_model_by_trigger_valid
    check (model_by_trigger is null or ai_model_by_trigger_valid(model_by_trigger));

-- updated_at follows every change, whoever makes it (the CLI or psql).
create or replace function ai_module_config_touch() returns trigger
language plpgsql as $$
begin
    new.updated_at := now();
    return new;
end
$$;

create trigger ai_module_config_touch
    before update on ai_module_config
    for each row execute function ai_module_config_touch();

-- Every replica caches configs and LISTENs on this channel; the payload is the
-- community id, or '*' when every community changed at once (TRUNCATE).
-- NOTIFY is sent at commit, so a listener never reloads before the change is
-- visible, and a rolled-back change notifies nobody.
create or replace function ai_module_config_notify() returns trigger
language plpgsql as $$
begin
    if tg_level = 'STATEMENT' then
        perform pg_notify('ai_module_config', '*');
    elsif tg_op = 'DELETE' then
        perform pg_notify('ai_module_config', old.community_id);
    else
        perform pg_notify('ai_module_config', new.community_id);
        if tg_op = 'UPDATE' and old.community_id <> new.community_id then
            perform pg_notify('ai_module_config', old.community_id);
        end if;
    end if;
    return null;
end
$$;

create trigger ai_module_config_notify
    after insert or update or delete on ai_module_config
    for each row execute function ai_module_config_notify();

create trigger ai_module_config_notify_truncate
    after truncate on ai_module_config
    for each statement execute function ai_module_config_notify();

-- Conversation turns, kept only for communities with persist_context (the
-- repository's insert checks the flag in the same statement). Deleting a
-- community's config deletes what was kept for it.
create table ai_conversation_context (
    id           bigserial primary key,
    community_id text not null
        references ai_module_config (community_id) on delete cascade,
    platform     text not null,
    channel_id   text not null,
    user_id      text not null,
    role         text not null
        constraint ai_conversation_context_role_known check (role in ('user', 'assistant')),
    speaker      text,
    content      text not null,
    created_at   timestamptz not null default now()
);

create index ai_conversation_context_conversation
    on ai_conversation_context (community_id, platform, channel_id, user_id, created_at);

create index ai_conversation_context_created_at
    on ai_conversation_context (created_at);
