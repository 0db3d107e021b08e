"""The image store: fetching, verifying, unpacking and checking VM images."""
