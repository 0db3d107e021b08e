"""Learning a guest's address on a bridge we do not own, from the DHCP ACK its server sends.

A raw ``AF_PACKET`` socket is bound to the guest's own tap, not to the bridge: a unicast reply
from a DHCP server elsewhere on the bridge is forwarded port to port and never reaches the
bridge device itself unless it is made promiscuous, while every frame for the guest leaves
through its tap. A classic BPF filter lets only UDP to port 68 through, so the guest's other
traffic costs nothing. The socket only listens: no packet is ever sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import socket
import struct
from ipaddress import IPv4Address

log = logging.getLogger(__name__)

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
SO_ATTACH_FILTER = 26
BOOTP_REPLY = 2
DHCP_MAGIC = b"\x63\x82\x53\x63"
BOOTP_CLIENT_PORT = (68).to_bytes(2, "big")
OPT_PAD, OPT_END, OPT_MESSAGE_TYPE = 0, 255, 53
DHCPACK = 5

# Offsets are from the IP header (SOCK_DGRAM strips the Ethernet header). Accepts IPv4 UDP to
# port 68 that is not a later fragment; SKF_AD_PROTOCOL loads the frame's EtherType.
_DROP = 10
_FILTER = (
    (0x28, 0, 0, 0xFFFFF000),  # 0: ldh [SKF_AD_PROTOCOL]  (EtherType)
    (0x15, 0, _DROP - 2, ETH_P_IP),  # 1: jeq #0x800
    (0x30, 0, 0, 9),  # 2: ldb [9]  (IP protocol)
    (0x15, 0, _DROP - 4, 17),  # 3: jeq #17 (UDP)
    (0x28, 0, 0, 6),  # 4: ldh [6]  (flags and fragment offset)
    (0x45, _DROP - 6, 0, 0x1FFF),  # 5: jset #0x1fff
    (0xB1, 0, 0, 0),  # 6: ldxb 4*([0]&0xf)  (IP header length)
    (0x48, 0, 0, 2),  # 7: ldh [x+2]  (UDP destination port)
    (0x15, 0, _DROP - 9, 68),  # 8: jeq #68
    (0x06, 0, 0, 0xFFFF),  # 9: ret #65535  (accept)
    (0x06, 0, 0, 0),  # 10: ret #0  (drop)
)


def _attach_filter(sock: socket.socket) -> None:
    code = b"".join(struct.pack("HBBI", *insn) for insn in _FILTER)
    buf = ctypes.create_string_buffer(code)
    prog = struct.pack("HxxxxxxP", len(_FILTER), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, prog)


def _message_type(options: bytes) -> int | None:
    i = 0
    while i < len(options):
        code = options[i]
        if code == OPT_END:
            return None
        if code == OPT_PAD:
            i += 1
            continue
        if i + 1 >= len(options):
            return None
        length = options[i + 1]
        if code == OPT_MESSAGE_TYPE and length == 1 and i + 2 < len(options):
            return options[i + 2]
        i += 2 + length
    return None


def parse_ack(packet: bytes, mac: str) -> str | None:
    """Return the address that IPv4 ``packet`` acknowledges to ``mac``, if it is such a DHCPACK."""
    if len(packet) < 20 or packet[0] >> 4 != 4 or packet[9] != socket.IPPROTO_UDP:
        return None
    udp = packet[(packet[0] & 0x0F) * 4 :]
    if udp[2:4] != BOOTP_CLIENT_PORT:
        return None
    bootp = udp[8:]
    if len(bootp) < 240 or bootp[0] != BOOTP_REPLY or bootp[1:3] != b"\x01\x06":
        return None
    if bootp[28:34] != bytes.fromhex(mac.replace(":", "")) or bootp[236:240] != DHCP_MAGIC:
        return None
    if _message_type(bootp[240:]) != DHCPACK:
        return None
    address = IPv4Address(bootp[16:20])
    return None if address.is_unspecified else str(address)


class DhcpAckSniffer:
    """Watches tap ``tap`` for DHCP ACKs to ``mac`` and remembers the latest address."""

    def __init__(self, tap: str, mac: str) -> None:
        self.tap = tap
        self.mac = mac
        self.ip: str | None = None
        self._seen = asyncio.Event()
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Open the socket and start listening; raises ``OSError`` when that is not allowed."""
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)  # protocol 0: nothing yet
        try:
            _attach_filter(sock)
            # ETH_P_ALL, not ETH_P_IP: on a bridge port only ETH_P_ALL sockets see the frames.
            sock.bind((self.tap, ETH_P_ALL))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._task = asyncio.get_running_loop().create_task(self._listen(sock))

    async def _listen(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                packet = await loop.sock_recv(sock, 65535)
            except OSError as e:  # the tap went away
                log.debug("stopped watching %s: %s", self.tap, e)
                return
            ip = parse_ack(packet, self.mac)
            if ip is not None:
                log.info("DHCP ACK on %s: %s is %s", self.tap, self.mac, ip)
                self.ip = ip
                self._seen.set()

    async def wait(self) -> None:
        """Return once an ACK has been seen."""
        await self._seen.wait()

    async def close(self) -> None:
        """Stop listening and close the socket."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
