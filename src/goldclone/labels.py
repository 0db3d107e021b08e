"""Labels on VMs, as Kubernetes has them (a key with an optional DNS-subdomain prefix, a short
value), and the ``key=value`` selectors that filter lists and event streams by them."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Annotated

from pydantic import AfterValidator, Field, StrictStr

MAX_LABELS = 64
_NAME = "[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_PREFIX = "[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_KEY_PATTERN = f"^({_PREFIX}/)?{_NAME}$"
_VALUE_PATTERN = f"^({_NAME})?$"
_KEY = re.compile(_KEY_PATTERN)
_VALUE = re.compile(_VALUE_PATTERN)


def is_label_key(key: str) -> bool:
    return _KEY.fullmatch(key) is not None and len(key.rpartition("/")[0]) <= 253


def _check_key(key: str) -> str:
    if not is_label_key(key):
        raise ValueError("a label key's prefix has at most 253 characters")
    return key


LabelKey = Annotated[
    StrictStr,
    Field(max_length=317, pattern=_KEY_PATTERN),
    AfterValidator(_check_key),
]
"""``[prefix/]name``: the name 1-63 characters of letters, digits, ``-``, ``_`` and ``.``,
starting and ending with a letter or digit; the prefix a lowercase DNS subdomain."""
LabelValue = Annotated[StrictStr, Field(max_length=63, pattern=_VALUE_PATTERN)]
"""Empty, or 1-63 characters as a key's name."""
Labels = Annotated[dict[LabelKey, LabelValue], Field(max_length=MAX_LABELS)]


def parse_selectors(selectors: Sequence[str]) -> dict[str, str]:
    """``["key=value", ...]`` as a map; ``ValueError`` saying which one is malformed."""
    wanted: dict[str, str] = {}
    for selector in selectors:
        key, equals, value = selector.partition("=")
        if not equals or not is_label_key(key) or _VALUE.fullmatch(value) is None:
            raise ValueError(
                f"label={selector!r} is not a selector: expected label=KEY=VALUE, with a "
                "Kubernetes-style label key and value"
            )
        if wanted.get(key, value) != value:
            raise ValueError(f"label {key!r} is asked to be both {wanted[key]!r} and {value!r}")
        wanted[key] = value
    return wanted


def matches(labels: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    """Whether ``labels`` have every ``key=value`` of ``wanted``."""
    return all(labels.get(key) == value for key, value in wanted.items())
