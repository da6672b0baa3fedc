"""Micro-benchmarks of Sealstream's hot paths (run them with ``python -m``)."""
