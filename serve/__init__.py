"""Answers: the grounded, compliant answer chain and the HTTP API."""
