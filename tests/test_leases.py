"""Lease holders are processes named by host, pid and start; old databases gain the columns."""

from __future__ import annotations

import sqlite3
import subprocess

from pipeline.state.db import Job, create_database_engine, open_database
from pipeline.state.leases import Holder, ProcessIdentity, holder_state, this_process
from pipeline.state.schema import upgrade_schema


def test_a_holder_is_alive_gone_or_on_another_host():
    me = this_process()
    assert holder_state(me.host, me.pid, me.start) == Holder.ALIVE
    # The same pid with another start time is a process that reused it: the holder is gone.
    assert holder_state(me.host, me.pid, "another-boot/1") == Holder.GONE
    assert holder_state("another-host", me.pid, me.start) == Holder.ELSEWHERE

    child = subprocess.Popen(["sleep", "30"])
    held = ProcessIdentity(me.host, child.pid, None)
    try:
        assert holder_state(held.host, held.pid, held.start) == Holder.ALIVE
        child.kill()
        child.wait()
        assert holder_state(held.host, held.pid, held.start) == Holder.GONE
    finally:
        child.kill()


def test_a_database_made_before_the_lease_columns_opens_and_gains_them(tmp_path):
    url = f"sqlite:///{tmp_path}/old.sqlite"
    open_database(url)
    with sqlite3.connect(tmp_path / "old.sqlite") as db:
        for table in ("job", "delivery"):
            for column in ("lease_host", "lease_pid", "lease_process_start"):
                db.execute(f"alter table {table} drop column {column}")
        db.execute("drop table alembic_version")  # as 0.1.0 made it, before revisions
    upgrade_schema(create_database_engine(url))  # `dicomnode db upgrade`
    sessions = open_database(url)
    with sessions() as session:
        assert session.query(Job).count() == 0
    with sqlite3.connect(tmp_path / "old.sqlite") as db:
        columns = {row[1] for row in db.execute("pragma table_info(job)")}
    assert {"lease_host", "lease_pid", "lease_process_start"} <= columns
