"""crossfed: federated multimodal learning with cross-modal recovery of missing modalities."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("crossfed")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
