"""Sealstream core: settings, errors, message crypto, key management and one adapter per server."""

__version__ = "0.1.0"
