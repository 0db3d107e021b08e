"""The VMware driver: linked clones on VMware Fusion or Workstation through ``vmrun``."""

from goldclone.drivers.vmware.driver import VMwareDriver

__all__ = ["VMwareDriver"]
