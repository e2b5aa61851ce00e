"""Offline evaluation: retrieval metrics, multiple-choice and open-ended answer sets, reports."""
