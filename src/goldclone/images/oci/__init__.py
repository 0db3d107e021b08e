"""Images in OCI registries: references, the distribution API, and the two formats a disk is
carried in (KubeVirt's ``containerDisk`` and goldclone's own chunked disk artifact)."""
