"""A network lab of namespaces on one machine (root only): see `netlab.lab`."""

from .lab import RSH, Host, Lab, LabError, cleanup_stale, missing_requirements

__all__ = ["RSH", "Host", "Lab", "LabError", "cleanup_stale", "missing_requirements"]
