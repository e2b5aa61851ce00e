"""Imported by the parse worker's fork server: the parsers, loaded once for every worker."""

from __future__ import annotations

from functools import cache

import unstructured.partition.auto  # noqa: F401
import unstructured.partition.docx  # noqa: F401
import unstructured.partition.html  # noqa: F401
import unstructured.partition.md  # noqa: F401
import unstructured.partition.pdf  # noqa: F401
import unstructured.partition.pptx  # noqa: F401
import unstructured.partition.text  # noqa: F401
import unstructured.partition.xlsx  # noqa: F401


@cache
def warm_up() -> None:
    """Load what the parsers load on first use (the spaCy model for sentence heuristics)."""
    from ingest.loaders import point_unstructured_at_packaged_spacy_model

    point_unstructured_at_packaged_spacy_model()
    unstructured.partition.text.partition_text(text="Warm up the parser. It reads sentences.")
    unstructured.partition.html.partition_html(text="<html><body><p>Warm up the parser.</p></body></html>")


try:  # in the fork server, so that every worker starts warm; a failure here is retried per worker
    warm_up()
except Exception:  # noqa: BLE001
    warm_up.cache_clear()
