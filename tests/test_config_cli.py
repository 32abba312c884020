"""`waddle-ai migrate` and `waddle-ai config` as an operator runs them, on real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import sys

import asyncpg
import orjson
import pytest

from config.secrets import generate_key

KEY = "sk-live-abcdefghijklmnop1234"


async def waddle(
    *args: str, database_url: str, stdin: bytes | None = None, **env: str
) -> tuple[int, str, str]:
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("DATABASE_URL", "CONFIG_ENCRYPTION_KEY")}
    environment.update({"DATABASE_URL": database_url, "LOG_LEVEL": "WARNING", **env})
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", *args, env=environment,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin or b""), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
def encryption_key() -> str:
    return generate_key()


async def test_migrate_applies_once_then_says_up_to_date(schema_dsn: str) -> None:
    code, out, err = await waddle("migrate", database_url=schema_dsn)
    assert code == 0, err
    assert "applied: 0001_initial" in out
    code, out, _ = await waddle("migrate", database_url=schema_dsn)
    assert code == 0
    assert "up to date" in out


async def test_set_get_list_delete_with_a_key_read_from_stdin(
    schema_dsn: str, encryption_key: str
) -> None:
    env = {"CONFIG_ENCRYPTION_KEY": encryption_key}
    code, out, err = await waddle(
        "config", "set", "penguins", "provider=waddleai", "temperature=0.4",
        "triggers=question,mention", "--api-key", "--json",
        database_url=schema_dsn, stdin=f"{KEY}\n".encode(), **env)
    assert code == 0, err
    shown = orjson.loads(out)
    assert shown["provider"] == "waddleai"
    assert shown["temperature"] == 0.4
    assert shown["triggers"] == ["question", "mention"]
    assert shown["api_key"] != KEY
    assert shown["api_key"].endswith(KEY[-4:])

    code, out, err = await waddle("config", "get", "penguins", database_url=schema_dsn, **env)
    assert code == 0, err
    assert "temperature" in out
    assert KEY not in out + err

    code, out, _ = await waddle("config", "list", "--json", database_url=schema_dsn, **env)
    assert [r["community_id"] for r in orjson.loads(out)] == ["penguins"]

    # The table holds no plaintext key.
    connection = await asyncpg.connect(schema_dsn)
    try:
        row = await connection.fetchrow("select * from ai_module_config")
    finally:
        await connection.close()
    assert KEY not in str(dict(row))

    code, out, _ = await waddle("config", "delete", "penguins", database_url=schema_dsn, **env)
    assert code == 0
    code, _, err = await waddle("config", "get", "penguins", database_url=schema_dsn, **env)
    assert code == 1
    assert "not configured" in err


async def test_bad_values_are_refused_naming_the_field(schema_dsn: str) -> None:
    code, _, err = await waddle("config", "set", "c1", "temperature=5",
                                "base_url=ftp://x", database_url=schema_dsn)
    assert code == 2
    assert "temperature" in err
    assert "base_url" in err


async def test_a_key_on_the_command_line_is_refused_and_not_echoed(
    schema_dsn: str, encryption_key: str
) -> None:
    code, out, err = await waddle("config", "set", "c1", f"api_key={KEY}",
                                  database_url=schema_dsn, CONFIG_ENCRYPTION_KEY=encryption_key)
    assert code == 2
    assert "--api-key" in err
    assert KEY not in out + err


async def test_storing_a_key_needs_the_encryption_key(schema_dsn: str) -> None:
    code, _, err = await waddle("config", "set", "c1", "--api-key",
                                database_url=schema_dsn, stdin=f"{KEY}\n".encode())
    assert code == 2
    assert "CONFIG_ENCRYPTION_KEY" in err


async def test_rotate_key_re_encrypts_with_the_newest_key(schema_dsn: str) -> None:
    old, new = generate_key(), generate_key()
    code, _, err = await waddle("config", "set", "c1", "--api-key", database_url=schema_dsn,
                                stdin=f"{KEY}\n".encode(), CONFIG_ENCRYPTION_KEY=old)
    assert code == 0, err
    code, out, err = await waddle("config", "rotate-key", database_url=schema_dsn,
                                  CONFIG_ENCRYPTION_KEY=f"{new},{old}")
    assert code == 0, err
    assert "re-encrypted 1" in out
    # The old key can go: the new one alone reads the stored key.
    code, out, err = await waddle("config", "get", "c1", "--json", database_url=schema_dsn,
                                  CONFIG_ENCRYPTION_KEY=new)
    assert code == 0, err
    assert orjson.loads(out)["api_key"].endswith(KEY[-4:])


async def test_without_a_database_the_commands_say_so() -> None:
    code, _, err = await waddle("config", "list", database_url="")
    assert code == 2
    assert "DATABASE_URL is not set" in err
