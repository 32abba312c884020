"""Create or upgrade the database schema from the plain SQL files in `migrations/`.

Every replica may run this at start, and an operator may run `waddle-ai
migrate` at the same moment, so the whole run holds one session-level
advisory lock: a second runner waits for the first, then finds every file
recorded and does nothing. Each file runs in its own transaction together
with its row in `ai_schema_migrations`, so a file is either applied and
recorded or neither, and a failed file leaves the ones before it in place.

Objects go in the connection's current schema (the first existing schema of
its `search_path`), so one database can hold several deployments.

An applied file that was edited afterwards is not run again (its version is
recorded); the checksum kept with it makes the edit visible in a warning.
Change the schema with a new file instead.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from config.database import Connection, Pool, connection_from
from schemas.errors import WaddleError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
VERSION_TABLE = "ai_schema_migrations"
# Fixed, so every runner of every replica contends for the same lock ("WADDLEAI").
LOCK_KEY = 0x574144444C454149


class MigrationError(WaddleError, RuntimeError):
    """A migration could not run; the message says which file and why."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """`0001_name.sql` -> version `0001_name`, in name order (hence the zero padding)."""
    files = sorted(path for path in directory.glob("*.sql") if path.is_file())
    return [Migration(path.stem, path.read_text(encoding="utf-8")) for path in files]


_CREATE_VERSION_TABLE = f"""
create table if not exists {VERSION_TABLE} (
    version    text primary key,
    applied_at timestamptz not null default now(),
    checksum   text
)
"""


async def migrate(pool_or_dsn: Pool | str, *, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply the files not applied yet; return their versions (empty: nothing to do)."""
    migrations = load_migrations(directory)
    async with connection_from(pool_or_dsn) as connection:
        schema = await connection.fetchval("select current_schema()")
        if schema is None:
            raise MigrationError(
                "no schema of the connection's search_path exists: create it first"
            )
        await connection.execute("select pg_advisory_lock($1)", LOCK_KEY)
        try:
            return await _apply_pending(connection, migrations, schema)
        finally:
            if not connection.is_closed():
                await connection.execute("select pg_advisory_unlock($1)", LOCK_KEY)


async def _apply_pending(
    connection: Connection, migrations: list[Migration], schema: str
) -> list[str]:
    await connection.execute(_CREATE_VERSION_TABLE)
    rows = await connection.fetch(f"select version, checksum from {VERSION_TABLE}")
    applied = {row["version"]: row["checksum"] for row in rows}
    done: list[str] = []
    for migration in migrations:
        if migration.version in applied:
            recorded = applied[migration.version]
            if recorded is not None and recorded != migration.checksum:
                log.warning("an applied migration was edited afterwards; it is not re-run",
                            extra={"action": "migrate", "version": migration.version,
                                   "schema": schema, "category": "system"})
            continue
        try:
            async with connection.transaction():
                await connection.execute(migration.sql)
                await connection.execute(
                    f"insert into {VERSION_TABLE} (version, checksum) values ($1, $2)",
                    migration.version, migration.checksum,
                )
        except Exception as exc:
            raise MigrationError(
                f"migration {migration.version} failed in schema {schema!r}: {exc}"
            ) from exc
        done.append(migration.version)
        log.info("migration applied", extra={
            "action": "migrate", "version": migration.version, "schema": schema,
            "category": "system"})
    return done


async def applied_versions(pool_or_dsn: Pool | str) -> list[str]:
    """What `migrate` recorded, oldest first; empty when it never ran here."""
    async with connection_from(pool_or_dsn) as connection:
        exists = await connection.fetchval("select to_regclass($1) is not null", VERSION_TABLE)
        if not exists:
            return []
        rows = await connection.fetch(
            f"select version from {VERSION_TABLE} order by version")
        return [str(row["version"]) for row in rows]


__all__ = [
    "LOCK_KEY",
    "MIGRATIONS_DIR",
    "VERSION_TABLE",
    "Migration",
    "MigrationError",
    "applied_versions",
    "load_migrations",
    "migrate",
]
