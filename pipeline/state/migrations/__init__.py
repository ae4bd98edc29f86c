"""Alembic migrations of the node's database (pipeline.state.schema runs them).

A change to the tables of pipeline.state.db needs a new revision here:
    .venv/bin/alembic -c pipeline/state/migrations/alembic.ini revision --autogenerate -m "..."
tests/test_schema.py fails while the models and the migrations disagree.
"""
