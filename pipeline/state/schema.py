"""The database's schema version: the Alembic revision it is at (pipeline/state/migrations).

A node opens only a database at its own newest revision. A new, empty database is made at
that revision; one made before migrations existed is recorded as the baseline. An older
one is brought up by `dicomnode db upgrade` (an admin's decision: every machine sharing it
must run the new version), and one newer than the node was written by a newer dicomnode,
whose tables this one does not know.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text
from sqlalchemy.engine import Engine

from pipeline.state.db import Base

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
# The schema of dicomnode 0.1.0, the last version without migrations.
BASELINE = "0001"
# Any constant: the key of the PostgreSQL advisory lock that makes processes starting at
# once on a new database (serve and its workers) make its tables one after the other.
SCHEMA_LOCK = 0x6469636F6D


class SchemaError(Exception):
    """A database at a revision this node cannot use; the message says what to do."""


@dataclass(frozen=True)
class SchemaVersion:
    current: str | None  # None: no tables yet
    head: str  # the newest revision this node knows

    @property
    def text(self) -> str:
        state = "up to date" if self.current == self.head else f"this dicomnode's: {self.head}"
        return f"schema revision {self.current or 'none (empty database)'} ({state})"


def check_schema(engine: Engine) -> None:
    """Make a new database's tables, record a pre-migration one as the baseline, and
    refuse a database at any revision but this node's newest (SchemaError)."""
    with engine.begin() as connection:
        _lock(connection)
        current = _made_or_adopted(connection)
    head = _scripts().get_current_head()
    if current == head:
        return
    if not _known(current):
        raise SchemaError(_newer(current, head))
    raise SchemaError(
        f"the database is at schema revision {current}, this dicomnode needs {head}: "
        "stop every node and worker that uses it, back it up, then run `dicomnode db upgrade`"
    )


def upgrade_schema(engine: Engine) -> tuple[str, str]:
    """Bring the database up to this node's newest revision; (revision before, after)."""
    with engine.connect() as connection, _foreign_keys_deferred(connection), connection.begin():
        _lock(connection)
        before = _made_or_adopted(connection)
        head = _scripts().get_current_head()
        if not _known(before):
            raise SchemaError(_newer(before, head))
        if before != head:
            config = _alembic_config()
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            _check_foreign_keys(connection)
            log.info("database schema upgraded from revision %s to %s", before, head)
    return before, head


@contextmanager
def _foreign_keys_deferred(connection: Connection) -> Iterator[None]:
    """SQLite alters a table by making a copy and dropping the original, which its foreign
    key checks forbid while rows refer to it: they are off during the migration (a pragma
    only takes effect outside a transaction) and the references are checked at its end."""
    if connection.dialect.name != "sqlite":
        yield
        return
    raw = connection.connection.dbapi_connection
    raw.execute("PRAGMA foreign_keys=OFF")
    try:
        yield
    finally:
        raw.execute("PRAGMA foreign_keys=ON")


def _check_foreign_keys(connection: Connection) -> None:
    if connection.dialect.name == "sqlite":
        broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        if broken:
            raise SchemaError(f"the upgrade left rows referring to no row: {broken[:5]}")


def schema_version(engine: Engine) -> SchemaVersion:
    """Where the database stands, without changing it."""
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
        if current is None and _has_tables(connection):
            current = f"{BASELINE} (not yet recorded)"
    return SchemaVersion(current, _scripts().get_current_head())


def _made_or_adopted(connection: Connection) -> str:
    """The database's revision, after making the tables of an empty one at the newest
    revision or recording one made before migrations as the baseline."""
    context = MigrationContext.configure(connection)
    current = context.get_current_revision()
    if current is not None:
        return current
    scripts = _scripts()
    if not _has_tables(connection):
        # The models are the newest revision (tests/test_schema.py checks they agree).
        Base.metadata.create_all(connection)
        context.stamp(scripts, "head")
        return scripts.get_current_head()
    _add_new_columns(connection)
    context.stamp(scripts, BASELINE)
    log.warning("database made before schema versions: recorded as revision %s", BASELINE)
    return BASELINE


def _add_new_columns(connection: Connection) -> None:
    """Add the nullable columns the baseline gained during 0.1.0's life (that version
    added them at start instead of migrating), so its oldest databases reach the baseline."""
    inspector = inspect(connection)
    for table in Base.metadata.sorted_tables:
        if not inspector.has_table(table.name):
            continue
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present or not column.nullable:
                continue
            kind = column.type.compile(dialect=connection.dialect)
            connection.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}")


def _has_tables(connection: Connection) -> bool:
    names = set(inspect(connection).get_table_names())
    return any(table.name in names for table in Base.metadata.sorted_tables)


def _lock(connection: Connection) -> None:
    # SQLite: the transaction began IMMEDIATE (pipeline.state.db), one writer at a time.
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK})


def _known(revision: str) -> bool:
    return any(script.revision == revision for script in _scripts().walk_revisions())


def _newer(current: str, head: str) -> str:
    return (
        f"the database is at schema revision {current}, which this dicomnode (newest "
        f"revision {head}) does not know: it was upgraded by a newer dicomnode; run that "
        "version here too"
    )


def _alembic_config() -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_alembic_config())
