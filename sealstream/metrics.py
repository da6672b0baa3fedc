"""Prometheus metrics shared by the core library; each service exports them on /metrics."""

from __future__ import annotations

from prometheus_client import Counter

KMS_CALLS = Counter("sealstream_kms_calls", "Requests made to the KMS", ["op"])
DEK_CACHE = Counter(
    "sealstream_dek_cache_lookups", "DEK lookups by the layer that answered", ["layer"]
)
