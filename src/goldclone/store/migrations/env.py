"""Alembic's environment: migrations run on the connection that ``store.schema`` hands over,
inside its transaction, in batch mode so that SQLite can alter tables."""

from alembic import context

context.configure(
    connection=context.config.attributes["connection"],
    target_metadata=None,
    render_as_batch=True,
)
with context.begin_transaction():
    context.run_migrations()
