"""The ``guestinfo`` settings of a VMware clone's ``.vmx``, which its guest reads through VMware
Tools (``vmware-rpctool "info-get guestinfo.<key>"``).

``guestinfo.metadata`` and ``guestinfo.userdata`` (base64, as their ``.encoding`` says) are
what cloud-init's VMware datasource reads; the metadata document is the NoCloud seed's
``meta-data``. Each ``metadata`` entry is also ``guestinfo.<key>`` on its own, as Go's builders
read their settings, so that a guest without cloud-init can read it with one call.
"""

from __future__ import annotations

import base64
import json

from goldclone.guest.config import GuestConfig
from goldclone.guest.nocloud import meta_data

PREFIX = "guestinfo."


def guestinfo(guest: GuestConfig) -> dict[str, str]:
    """The ``.vmx`` settings that configure ``guest``, by key."""

    def encoded(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    settings = {
        f"{PREFIX}metadata": encoded(json.dumps(meta_data(guest), sort_keys=True)),
        f"{PREFIX}metadata.encoding": "base64",
    }
    if guest.user_data is not None:
        settings[f"{PREFIX}userdata"] = encoded(guest.user_data)
        settings[f"{PREFIX}userdata.encoding"] = "base64"
    settings |= {f"{PREFIX}{key}": value for key, value in guest.metadata.items()}
    return settings
