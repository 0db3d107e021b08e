"""A restored guest's own identity, given through the QEMU guest agent: a machine restored
from a memory template wakes up as the template, so it is told its hostname, SSH keys and
metadata, gets new SSH host keys, and runs its ``#!`` user data. A machine of a warm pool gets
its host keys when it is restored into the pool, and the rest when a request claims it.

The work is one POSIX shell script, which the QEMU driver sends as ``guest-exec``'s standard
input (never on a command line, since it holds the secrets). It forks as few programs as it
can: each costs a guest under TCG milliseconds, and a claim from a warm pool waits for it.
It keys the image's default user (the account with UID 1000, as cloud-init makes it; root
where there is none) and writes the metadata to ``/run/goldclone/metadata.json`` (0600). A
``#cloud-config`` document needs cloud-init's first boot, so such a VM is never restored (the
service boots it cold).
"""

from __future__ import annotations

import json
import shlex

from goldclone.guest.config import GuestConfig

METADATA_PATH = "/run/goldclone/metadata.json"


def script(guest: GuestConfig, new_machine: bool) -> str:
    """The shell script that gives a restored guest ``guest``'s identity; and, if it is a
    ``new_machine`` just restored (not a pooled one, which got them when it was), new SSH
    host keys."""
    keys = "".join(f"{key}\n" for key in guest.ssh_authorized_keys)
    user_data = guest.user_data if guest.user_data is not None else ""
    return f"""\
set -eu
umask 077
hostname {shlex.quote(guest.hostname)}
if [ -w /etc/hostname ]; then echo {shlex.quote(guest.hostname)} > /etc/hostname; fi
user=root home=/root
while IFS=: read -r name _ uid _ _ dir _; do
    if [ "$uid" = 1000 ]; then user=$name home=$dir; break; fi
done < /etc/passwd
mkdir -p "$home/.ssh" /run/goldclone
printf %s {shlex.quote(keys)} > "$home/.ssh/authorized_keys"
chown -R "$user" "$home/.ssh" 2>/dev/null || true
printf %s {shlex.quote(json.dumps(dict(guest.metadata), sort_keys=True))} > {METADATA_PATH}
if {"true" if new_machine else "false"} && [ -d /etc/ssh ] && command -v ssh-keygen >/dev/null; then
    rm -f /etc/ssh/ssh_host_*key /etc/ssh/ssh_host_*key.pub
    ssh-keygen -A >/dev/null
    systemctl restart ssh 2>/dev/null || pkill -HUP -x sshd 2>/dev/null || true
fi
user_data={shlex.quote(user_data)}
if [ "${{user_data#'#!'}}" != "$user_data" ]; then
    printf '%s' "$user_data" > /run/goldclone/user-data
    chmod 700 /run/goldclone/user-data
    /run/goldclone/user-data > /run/goldclone/user-data.log 2>&1 &
fi
"""
