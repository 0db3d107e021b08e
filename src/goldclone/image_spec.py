"""Where a VM's image comes from: a package at a URL with its checksum, a reference in a
registry, or a gold image that a host holds, by its ID; the request field ``image`` of VMs,
pools and ``POST /images``."""

from __future__ import annotations

import hashlib

from pydantic import (
    BaseModel,
    ConfigDict,
    StrictStr,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core.core_schema import SerializerFunctionWrapHandler

from goldclone import references
from goldclone.fields import (
    CHECKSUM_HEX_LENGTH,
    HEX,
    ChecksumType,
    HttpUrl,
    ImageId,
    OciReference,
    checksum_variants,
    http_url,
    oci_reference,
)
from goldclone.problems import FieldProblem
from goldclone.references import Reference


class ImageSpec(BaseModel):
    """Where a VM's image comes from: a package at ``url`` and what it must hash to, a
    registry reference (``oci``), pinned to a manifest's digest once it is resolved, or a gold
    image's ``id`` (one made from a VM, say), which comes from nowhere: only the hosts that
    hold it have it."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"anyOf": checksum_variants()})

    url: HttpUrl | None = None
    checksum: StrictStr | None = None
    checksum_type: ChecksumType | None = None
    oci: OciReference | None = None
    id: ImageId | None = None

    _url = field_validator("url")(http_url)
    _oci = field_validator("oci")(oci_reference)

    @field_validator("checksum")
    @classmethod
    def _hex(cls, checksum: str | None) -> str | None:
        if checksum is not None and not HEX.fullmatch(checksum):
            raise ValueError("must be hexadecimal")
        return checksum

    @model_validator(mode="after")
    def _one_source(self) -> ImageSpec:
        if self.id is not None:
            if any(x is not None for x in (self.url, self.checksum, self.checksum_type, self.oci)):
                raise FieldProblem("id", "give either id, oci, or url and checksum")
            return self
        if self.oci is not None:
            if self.url is not None or self.checksum is not None or self.checksum_type is not None:
                raise FieldProblem("oci", "give either oci, or url and checksum, not both")
            return self
        if self.url is None:
            raise FieldProblem("url", "is required (or give oci)")
        if self.checksum is None:
            raise FieldProblem("checksum", "is required")
        self.checksum_type = self.checksum_type or "sha256"
        expected = CHECKSUM_HEX_LENGTH[self.checksum_type]
        if len(self.checksum) != expected:
            raise FieldProblem(
                "checksum",
                f"a {self.checksum_type} checksum has {expected} hex digits, "
                f"not {len(self.checksum)}",
            )
        return self

    @property
    def reference(self) -> Reference | None:
        return references.parse(self.oci) if self.oci is not None else None

    @property
    def key(self) -> str:
        """The name of the gold image: ``<type>-<lowercase hex>`` of a package's checksum,
        ``oci-<hex>`` of a pinned reference's manifest; ``tag-<hex>`` (a hash of the
        reference) names nothing until the tag is resolved."""
        if self.id is not None:
            return self.id
        if (ref := self.reference) is not None:
            if ref.digest is not None:
                return f"oci-{references.digest_hex(ref.digest)}"
            return "tag-" + hashlib.sha256(ref.named.encode()).hexdigest()
        assert self.checksum is not None
        return f"{self.checksum_type}-{self.checksum.lower()}"

    @property
    def source(self) -> str:
        """Where the image is fetched from: its URL or its reference (an image named by its ID:
        that name)."""
        source = self.url or self.oci or self.id
        assert source is not None
        return source

    @property
    def pinned(self) -> bool:
        """Whether it names its image for good: a checksum, a reference with a digest, or an
        image's ID."""
        ref = self.reference
        return ref is None or ref.digest is not None

    @model_serializer(mode="wrap")
    def _only_given(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        """A URL's spec without ``oci``, a reference's with ``oci`` alone."""
        dumped: dict[str, object] = handler(self)
        return {name: value for name, value in dumped.items() if value is not None}
