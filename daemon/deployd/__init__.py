"""The deployd daemon: socket server, lease manager, lease stores and notifier."""

from deployd_client import __version__

__all__ = ["__version__"]
