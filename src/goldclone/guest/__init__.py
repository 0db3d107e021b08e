"""What a VM's guest is told about itself: its hostname, SSH keys, user data and metadata, and
how each hypervisor hands them over (a NoCloud seed and fw_cfg for QEMU, guestinfo for
VMware)."""
