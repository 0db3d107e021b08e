"""New SSH host keys for a restored machine, made on the host, which takes a fraction of what
``ssh-keygen -A`` (its RSA key above all) takes in a guest under TCG (docs/design.md, "Memory
templates"). The three kinds that ``ssh-keygen -A`` makes, in OpenSSH's own file formats."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

SSH_DIR = "/etc/ssh"
SSHD_CONFIG = f"{SSH_DIR}/sshd_config"
"""Where a guest with an SSH server has its configuration: one without it gets no keys."""
RSA_BITS = 3072
"""What OpenSSH's ``ssh-keygen`` makes by default."""


@dataclass(frozen=True)
class HostKey:
    kind: str
    private: str
    public: str

    @property
    def path(self) -> str:
        return f"{SSH_DIR}/ssh_host_{self.kind}_key"


def new_host_keys() -> list[HostKey]:
    """An RSA, an ECDSA (P-256) and an Ed25519 key; blocks for up to a second (RSA)."""
    made: dict[str, PrivateKeyTypes] = {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS),
        "ecdsa": ec.generate_private_key(ec.SECP256R1()),
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
    }
    return [HostKey(kind, *_openssh(key)) for kind, key in made.items()]


def _openssh(key: PrivateKeyTypes) -> tuple[str, str]:
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private.decode(), public.decode() + "\n"
