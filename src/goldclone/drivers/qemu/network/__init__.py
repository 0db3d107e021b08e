"""Guest networking for the QEMU driver: bridges, one tap per VM, DHCP and IP discovery.

Three network types:

* ``nat`` and ``hostonly`` are bridges that goldclone creates, addresses and owns, each with
  its own dnsmasq. ``nat`` masquerades its subnet and turns on IPv4 forwarding; ``hostonly``
  drops anything the host would forward into or out of it. A guest's address is read from that
  dnsmasq's lease file.
* ``bridged`` puts taps on an existing host bridge named in the configuration; goldclone runs
  no DHCP server there and never creates or removes that bridge. A guest's address is found,
  in this order, from: the DHCP ACK its server sends it, seen by a listen-only ``AF_PACKET``
  socket on the guest's tap (works with any DHCP server on the bridge; see ``sniffer``); the
  lease file of that server, if configured (dnsmasq format); the kernel's neighbour table for
  the bridge. No traffic is ever sent to find an address.

State lives in ``<state_dir>/<network type>/`` (dnsmasq pid file, leases, hosts file).
"""

from goldclone.drivers.qemu.network.attachment import Attachment
from goldclone.drivers.qemu.network.manager import Networks

__all__ = ["Attachment", "Networks"]
