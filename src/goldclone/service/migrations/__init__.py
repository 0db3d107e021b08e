"""The store's schema migrations (Alembic). ``service.schema`` runs them at start."""
