"""Bringing the store's database to this code's schema, with Alembic, at every start.

A database made before goldclone had migrations (up to commit 8682a97) holds the ``vms`` table
of the first revision and no ``alembic_version``: it is stamped with that revision and then
upgraded like any other. A database whose revision this code does not know was made by a newer
goldclone, and is refused: its data stays as it is.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect

from goldclone.errors import SchemaTooNew

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
BEFORE_MIGRATIONS = "0001"
"""The revision whose schema a database made before migrations has."""


def upgrade(connection: Connection) -> None:
    """Migrate the database on ``connection`` to the newest revision this code knows."""
    config = _config()
    config.attributes["connection"] = connection
    script = ScriptDirectory.from_config(config)
    known = {revision.revision for revision in script.walk_revisions()}
    current = set(MigrationContext.configure(connection).get_current_heads())
    if unknown := current - known:
        raise SchemaTooNew(
            f"the database's schema is at revision {', '.join(sorted(unknown))}, which this "
            f"goldclone (revisions up to {script.get_current_head()}) does not know: it was "
            "made by a newer goldclone. Run that one, or use another data dir; nothing was "
            "changed"
        )
    if not current and inspect(connection).has_table("vms"):
        command.stamp(config, BEFORE_MIGRATIONS)
        current = {BEFORE_MIGRATIONS}
    newest = script.get_current_head()
    if current != {newest}:
        earlier = ", ".join(sorted(current)) or "none (a new database)"
        log.info("migrating the store's schema from revision %s to %s", earlier, newest)
    command.upgrade(config, "head")


def head() -> str | None:
    """The newest revision this code knows."""
    return ScriptDirectory.from_config(_config()).get_current_head()


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config
