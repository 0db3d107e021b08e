"""goldclone: disposable linked-clone VMs from verified gold images."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("goldclone")
except PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "0.0.0"
