"""The database carries its schema version: the migrations and the models agree, a
predecessor's database is upgraded in place, and a database newer than the node is refused."""

from __future__ import annotations

import sqlite3

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from pipeline.state.db import Base, create_database_engine, open_database
from pipeline.state.schema import BASELINE, _alembic_config, _scripts, upgrade_schema
from tests.support.nodeproc import run_dicomnode, write_config
from tests.support.paths import REPO

PREDECESSOR = REPO / "tests" / "data" / "predecessor-0.1.0.sql"


def migrated_differences(url: str) -> list:
    """What the models have that the migrations do not make, or the reverse."""
    engine = create_database_engine(url)
    with engine.begin() as connection:
        config = _alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
        return compare_metadata(MigrationContext.configure(connection), Base.metadata)


def test_the_migrations_make_exactly_the_models_tables_on_sqlite(tmp_path):
    differences = migrated_differences(f"sqlite:///{tmp_path / 'db.sqlite'}")
    assert differences == [], (
        "pipeline.state.db and pipeline/state/migrations disagree: add a migration "
        f"(see pipeline/state/migrations/__init__.py): {differences}"
    )


def test_the_migrations_make_exactly_the_models_tables_on_postgresql(postgres_url):
    assert migrated_differences(postgres_url) == []


def test_a_new_database_is_made_at_the_newest_revision(tmp_path):
    open_database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with sqlite3.connect(tmp_path / "db.sqlite") as db:
        (version,) = db.execute("select version_num from alembic_version").fetchone()
    assert version == _scripts().get_current_head()


def test_a_predecessors_database_is_upgraded_and_keeps_its_rows(tmp_path):
    config = write_config(tmp_path, 11112)
    with sqlite3.connect(tmp_path / "node.sqlite") as db:
        db.executescript(PREDECESSOR.read_text())

    version = run_dicomnode("db", "version", "--config", str(config))
    assert version.returncode == 0 and f"{BASELINE} (not yet recorded)" in version.stdout

    head = _scripts().get_current_head()
    if head != BASELINE:  # a node refuses it until it is upgraded
        refused = run_dicomnode("status", "--config", str(config))
        assert refused.returncode == 2
        assert f"at schema revision {BASELINE}, this dicomnode needs {head}" in refused.stderr
        assert "run `dicomnode db upgrade`" in refused.stderr

    upgrade = run_dicomnode("db", "upgrade", "--config", str(config))
    assert upgrade.returncode == 0, upgrade.stderr
    assert upgrade.stdout.strip().endswith(head)
    with sqlite3.connect(tmp_path / "node.sqlite") as db:
        assert db.execute("select version_num from alembic_version").fetchall() == [(head,)]

    status = run_dicomnode("status", "--json", "--config", str(config))
    assert status.returncode == 0, status.stderr
    assert '"output_series_uid": "1.2.826.0.1.3680043.8.498.5"' in status.stdout
    assert '"state": "sent"' in status.stdout
    again = run_dicomnode("db", "upgrade", "--config", str(config))
    assert "already up to date" in again.stdout
    with sqlite3.connect(tmp_path / "node.sqlite") as db:
        assert db.execute("pragma foreign_key_check").fetchall() == []
        assert db.execute("select count(*) from instance").fetchone() == (1,)


@pytest.mark.parametrize("command_line", [("serve",), ("status",)])
def test_a_database_newer_than_the_node_is_refused(tmp_path, command_line):
    config = write_config(tmp_path, 11112)
    open_database(f"sqlite:///{tmp_path / 'node.sqlite'}")
    with sqlite3.connect(tmp_path / "node.sqlite") as db:
        db.execute("update alembic_version set version_num = '9999_future'")

    result = run_dicomnode(*command_line, "--config", str(config))
    assert result.returncode == 2
    assert "database refused: the database is at schema revision 9999_future" in result.stderr
    assert "upgraded by a newer dicomnode" in result.stderr
    assert "Traceback" not in result.stderr
    upgrade = run_dicomnode("db", "upgrade", "--config", str(config))
    assert upgrade.returncode == 2 and "newer dicomnode" in upgrade.stderr


@pytest.mark.parametrize("made_by", ["console", "console with 16-character accession numbers"])
def test_a_database_the_console_made_before_revisions_is_upgraded(tmp_path, made_by):
    """The console's first version made its tables (heartbeat, audit) and
    series.accession_number itself: recorded as the baseline, the upgrade makes only what
    is missing and ends with the models' tables exactly."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    open_database(url)
    with sqlite3.connect(tmp_path / "db.sqlite") as db:
        db.execute("drop table alembic_version")  # made before revisions
        if made_by.endswith("numbers"):
            db.execute("drop index ix_series_accession_number")
            db.execute("alter table series drop column accession_number")
            db.execute("alter table series add column accession_number varchar(16)")
            db.execute("drop table audit")
            db.execute(
                "create table audit (id integer not null primary key, at datetime not null, "
                "event varchar(32) not null, origin varchar not null, study_uid varchar(64), "
                "series_uid varchar(64), accession_number varchar(16), job_id integer, "
                "delivery_id integer, destination varchar, model varchar, "
                "model_version varchar, detail varchar not null)"
            )
            for column in ("at", "study_uid", "accession_number", "destination"):
                db.execute(f"create index ix_audit_{column} on audit ({column})")
        db.execute("insert into heartbeat (role, host, pid, version, started_at, beat_at) "
                   "values ('serve', 'h', 1, '0.1.0', '2026-11-30', '2026-11-30')")  # fmt: skip

    engine = create_database_engine(url)
    before, after = upgrade_schema(engine)
    assert (before, after) == (BASELINE, _scripts().get_current_head())
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    with sqlite3.connect(tmp_path / "db.sqlite") as db:
        assert db.execute("select host from heartbeat").fetchall() == [("h",)]
