#!/bin/sh
# The page busybox httpd serves at "/": proves which VM answers, by its MACs.

printf 'Content-Type: text/plain\r\n\r\n'
echo "goldclone demo guest"
for path in /sys/class/net/*; do
    [ -e "$path/device" ] || continue
    nic=${path##*/}
    addrs=$(ip -4 -o addr show dev "$nic" | sed -n 's/.* inet \([0-9.]*\).*/\1/p')
    echo "$nic $(cat "$path/address")" $addrs
done
echo "dns" $(sed -n 's/^nameserver //p' /etc/resolv.conf 2>/dev/null)
