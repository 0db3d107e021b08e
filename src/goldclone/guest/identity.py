"""A restored guest's own identity, given through the QEMU guest agent: a machine restored
from a memory template wakes up as the template, so it is told its hostname, SSH keys and
metadata, gets new SSH host keys (made on the host: ``hostkeys``), and runs its ``#!`` user
data. A machine of a warm pool gets its host keys when it is restored into the pool, and the
rest when a request claims it.

What a request gives is written as files, with the agent's file commands (``guest-file-*``,
never a command line, since they hold the secrets): a claim from a warm pool waits for it,
and each program a guest under TCG forks costs it milliseconds. The files go to the image's
default user (the account with UID 1000, as cloud-init makes it; root where there is none)
and to ``/run/goldclone/`` (``metadata.json``, 0600). They are made, with their owners and
modes, by the script that a machine runs once when it is restored (``new_machine_script``);
writing keeps both. A ``#cloud-config`` document needs cloud-init's first boot, so such a VM
is never restored (the service boots it cold).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

from goldclone.guest.config import GuestConfig
from goldclone.guest.hostkeys import SSH_DIR, HostKey

RUN_DIR = "/run/goldclone"
METADATA_PATH = f"{RUN_DIR}/metadata.json"
USER_DATA_PATH = f"{RUN_DIR}/user-data"
HOSTNAME_PATHS = ("/proc/sys/kernel/hostname", "/etc/hostname")
"""Writing the first sets the running kernel's hostname; the second keeps it after a reboot."""
DEFAULT_UID = "1000"
_RNDRESEEDCRNG = 0x5207
"""``_IO('R', 0x07)``, from linux/random.h."""


@dataclass(frozen=True)
class Account:
    """The user that gets the SSH keys, and its home."""

    name: str
    home: str

    @property
    def authorized_keys(self) -> str:
        return f"{self.home}/.ssh/authorized_keys"


@dataclass(frozen=True)
class GuestFile:
    path: str
    content: str


def default_account(passwd: str) -> Account:
    """The account with UID 1000 in ``passwd`` (``/etc/passwd``'s text), or root."""
    for line in passwd.splitlines():
        fields = line.split(":")
        if len(fields) == 7 and fields[2] == DEFAULT_UID:
            return Account(fields[0], fields[5])
    return Account("root", "/root")


def new_machine_script(account: Account, host_keys: list[HostKey], seed: bytes, now_ns: int) -> str:
    """The script that a machine runs once, just restored: its clock goes to ``now_ns`` (the
    host's time as the script is sent; ``guest-set-time`` is slow in a Debian guest, for its
    ``hwclock``), ``seed`` (random bytes from the host) goes into the kernel's random pool,
    which is reseeded from it at once, ``host_keys`` (``hostkeys.new_host_keys``; none for a
    guest without an SSH server) replace its SSH host keys, and the files that ``files``
    writes are made with their owners and modes. An sshd before OpenSSH 9.8 re-executes
    itself for each connection and reads the host keys then, so it is left running (its
    restart took seconds under TCG); from 9.8 the listener hands them to ``sshd-session``
    and is restarted.

    The reseed is the kernel's ``RNDRESEEDCRNG`` ioctl, through perl (essential on Debian and
    Ubuntu) or python3: a kernel without the vmgenid driver (Debian's cloud kernel has none)
    would otherwise go on with the template's generator state for up to a minute, and two
    clones read the same bytes from ``/dev/urandom``. Files are written with the shell's own
    ``printf``: each program a guest under TCG starts costs it a tenth of a second or more."""
    ssh_dir = shlex.quote(f"{account.home}/.ssh")
    made = "; ".join(
        f": > {shlex.quote(path)}"
        for path in (account.authorized_keys, METADATA_PATH, USER_DATA_PATH)
    )
    seconds, fraction = divmod(now_ns, 10**9)
    return f"""\
set -eu
date -u -s @{seconds}.{fraction:09d} >/dev/null 2>&1 || true
umask 077
printf '{_octal(seed)}' > /dev/urandom
perl -e 'open(my $r, ">", "/dev/urandom") or exit 1; ioctl($r, {_RNDRESEEDCRNG}, 0) or exit 1' \\
    2>/dev/null || python3 -c 'import fcntl, os
fcntl.ioctl(os.open("/dev/urandom", os.O_WRONLY), {_RNDRESEEDCRNG})' 2>/dev/null || true
mkdir -p {ssh_dir} {RUN_DIR}
{made}
chmod 700 {USER_DATA_PATH}
chown -R {shlex.quote(account.name)} {ssh_dir} 2>/dev/null || true
{_replace_host_keys(host_keys) if host_keys else ""}"""


def _replace_host_keys(host_keys: list[HostKey]) -> str:
    private = "".join(f"printf '%s' {shlex.quote(key.private)} > {key.path}\n" for key in host_keys)
    public = "".join(
        f"printf '%s' {shlex.quote(key.public)} > {key.path}.pub\n" for key in host_keys
    )
    return f"""\
rm -f {SSH_DIR}/ssh_host_*key {SSH_DIR}/ssh_host_*key.pub
{private}umask 022
{public}umask 077
if [ -e /usr/lib/openssh/sshd-session ] || [ -e /usr/libexec/openssh/sshd-session ]; then
    systemctl restart ssh 2>/dev/null || systemctl restart sshd 2>/dev/null \\
        || pkill -HUP -x sshd 2>/dev/null || true
fi
"""


def _octal(data: bytes) -> str:
    """``data`` as the octal escapes of ``printf``'s format (POSIX has no ``\\x``)."""
    return "".join(f"\\{byte:03o}" for byte in data)


def files(guest: GuestConfig, account: Account) -> list[GuestFile]:
    """What the guest is told, as the files to write (each replaced whole)."""
    written = [GuestFile(path, f"{guest.hostname}\n") for path in HOSTNAME_PATHS]
    keys = "".join(f"{key}\n" for key in guest.ssh_authorized_keys)
    written.append(GuestFile(account.authorized_keys, keys))
    written.append(GuestFile(METADATA_PATH, json.dumps(dict(guest.metadata), sort_keys=True)))
    if user_data_script(guest) is not None:
        written.append(GuestFile(USER_DATA_PATH, guest.user_data or ""))
    return written


def user_data_script(guest: GuestConfig) -> str | None:
    """The command line that starts a ``#!`` user data script, in the background, its output
    logged beside it; ``None`` without one."""
    if guest.user_data is None or guest.needs_first_boot:
        return None
    return f"{USER_DATA_PATH} > {USER_DATA_PATH}.log 2>&1 &"
