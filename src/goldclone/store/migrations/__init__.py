"""The store's schema migrations (Alembic). ``store.schema`` runs them at start."""
