"""Ingestion: parse documents, clean them, cut semantic chunks, extract key information, store."""
