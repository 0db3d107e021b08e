#!/bin/sh
# The page busybox httpd serves at "/": proves which VM answers, by its MACs, and what it was
# told: its hostname, SSH keys and metadata (from fw_cfg).

printf 'Content-Type: text/plain\r\n\r\n'
echo "goldclone demo guest"
for path in /sys/class/net/*; do
    [ -e "$path/device" ] || continue
    nic=${path##*/}
    addrs=$(ip -4 -o addr show dev "$nic" | sed -n 's/.* inet \([0-9.]*\).*/\1/p')
    echo "$nic $(cat "$path/address")" $addrs
done
echo "dns" $(sed -n 's/^nameserver //p' /etc/resolv.conf 2>/dev/null)
echo "hostname $(hostname)"
while read -r key; do echo "ssh-key $key"; done < /root/.ssh/authorized_keys
# a guest restored from a memory template is told its metadata by the guest agent
metadata=/run/goldclone/metadata.json
[ -r "$metadata" ] || metadata=/sys/firmware/qemu_fw_cfg/by_name/opt/goldclone/metadata/raw
[ -r "$metadata" ] && echo "metadata $(cat "$metadata")"
