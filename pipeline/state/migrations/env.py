"""How Alembic reaches the database: through the connection pipeline.state.schema hands it,
or, for `alembic revision --autogenerate`, the URL of alembic.ini."""

from alembic import context

from pipeline.state.db import Base, create_database_engine

config = context.config
connection = config.attributes.get("connection")


def run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite alters a table by copying it: batch mode does that for ALTER COLUMN.
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    run(connection)
else:
    with create_database_engine(config.get_main_option("sqlalchemy.url")).begin() as opened:
        run(opened)
