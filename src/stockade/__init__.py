"""Stockade: label-based microsegmentation that programs each host's native firewall."""

__version__ = "0.1.0"
