"""Alembic environment: run with the connection the state store hands over (never a URL from a file)."""

from __future__ import annotations

from alembic import context

from connector.state.tables import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
