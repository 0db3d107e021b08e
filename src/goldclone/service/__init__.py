"""The VM service: admission, the lifecycle of each VM, recovery, the image catalog, and the
store with its state machine."""

from goldclone.service.vms import VMService

__all__ = ["VMService"]
