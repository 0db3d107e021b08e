"""The ``goldclone`` command. Its client commands load only the client and the API models; the
server and its parts are imported when ``serve`` runs."""

from goldclone.cli.main import main

__all__ = ["main"]
