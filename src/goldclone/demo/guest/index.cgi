#!/bin/sh
# The page busybox httpd serves at "/": proves which VM answers, by its MACs, and what it was
# told: its hostname, disk size, SSH keys and metadata (from fw_cfg). Clients poll it until the
# guest is up, so it reads with shell builtins: each program that a guest under TCG starts
# costs its host milliseconds of CPU. Only the addresses need one, `ip`.

printf 'Content-Type: text/plain\r\n\r\n'
echo "goldclone demo guest"
for path in /sys/class/net/*; do
    [ -e "$path/device" ] || continue
    read -r mac < "$path/address"
    # shellcheck disable=SC2046 # split into words on purpose: "... inet ADDRESS/PREFIX ..."
    set -- $(ip -4 -o addr show dev "${path##*/}")
    addrs=""
    while [ $# -gt 1 ]; do
        [ "$1" = inet ] && addrs="$addrs ${2%/*}"
        shift
    done
    echo "${path##*/} $mac$addrs"
done
servers=""
if [ -r /etc/resolv.conf ]; then
    while read -r key value _; do
        [ "$key" = nameserver ] && servers="$servers $value"
    done < /etc/resolv.conf
fi
echo "dns$servers"
read -r name < /proc/sys/kernel/hostname
echo "hostname $name"
read -r sectors < /sys/block/vda/size # 512-byte sectors, whatever the disk's own
echo "disk $((sectors * 512))"
while read -r key; do echo "ssh-key $key"; done < /root/.ssh/authorized_keys
# a guest restored from a memory template is told its metadata by the guest agent
metadata=/run/goldclone/metadata.json
[ -r "$metadata" ] || metadata=/sys/firmware/qemu_fw_cfg/by_name/opt/goldclone/metadata/raw
if [ -r "$metadata" ]; then
    IFS= read -r json < "$metadata" # JSON without a newline: read says EOF but keeps it
    echo "metadata $json"
fi
