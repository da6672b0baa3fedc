"""Index terms of a text for tests that write documents directly (no indexer in between).

STAND-IN until the `icu` branch merges (SEARCH_CONTRACT.md): analysis with sealstream.tokens in
this process, then `document_terms`, as the indexer does for a plain tenant.
"""

from __future__ import annotations

from sealstream.adapters.opensearch import TextToken, document_terms
from sealstream.tokens import unicode_words


def plain_terms(text: str) -> list[str]:
    """The `tokens` of a plain tenant's document holding `text`."""
    return document_terms([TextToken(w, w, 0, 0, n) for n, w in enumerate(unicode_words(text))])
