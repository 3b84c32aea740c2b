"""hubc's Hub-facing layer: model sources, the optimize path, model cards, pushing, and the CLI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hubc")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
