from goldclone.drivers.qemu.driver import QemuDriver

__all__ = ["QemuDriver"]
