"""The HTTP API: the FastAPI app over the VM service, and the guards in front of it."""

from goldclone.api.app import create_app

__all__ = ["create_app"]
