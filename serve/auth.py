"""API keys and what each may do: read a KB (ask, search, list) or also write it (upload, delete)."""

from __future__ import annotations

import hmac
import json
import os
from dataclasses import dataclass

from kb.settings import ConfigError, Settings

NO_KEYS = ('no API keys configured: set serve.api_keys in the config or KB_API_KEYS '
           '(JSON, e.g. {"my-key": ["*:rw"]})')
"""Why the API and the staff app refuse to start without keys."""


@dataclass(frozen=True)
class Grant:
    """The rights of one key: readable and writable KB names ("*" for all)."""

    read: frozenset[str]
    write: frozenset[str]

    def can_read(self, kb: str) -> bool:
        return "*" in self.read or kb in self.read or self.can_write(kb)

    def can_write(self, kb: str) -> bool:
        return "*" in self.write or kb in self.write


def parse_grant(entries: list[str]) -> Grant:
    """The KBs an API key may read and write, from `NAME` or `NAME:r` (read) and `NAME:rw` entries."""
    read, write = set(), set()
    for e in entries:
        name, _, mode = str(e).partition(":")
        if mode not in ("", "r", "rw"):
            raise ConfigError(f"API key entry {e!r}: the mode after ':' must be 'r' or 'rw'")
        (write if mode == "rw" else read).add(name)
    return Grant(frozenset(read), frozenset(write))


class KeyRing:
    """Keys from `serve.api_keys`, or from KB_API_KEYS (JSON `{"KEY": ["kb1", "docs:rw", "*"]}`), which wins."""

    def __init__(self, keys: dict[str, list[str]]) -> None:
        self._grants = {k: parse_grant(v) for k, v in keys.items() if k}

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        raw = os.environ.get("KB_API_KEYS")
        if raw:
            try:
                keys = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ConfigError(f"KB_API_KEYS is not valid JSON: {e}") from e
            if not isinstance(keys, dict) or not all(isinstance(v, list) for v in keys.values()):
                raise ConfigError('KB_API_KEYS must be a JSON object {"KEY": ["kb1", "kb2:rw", "*"]}')
            return cls(keys)
        return cls(settings.serve.api_keys)

    @classmethod
    def required(cls, settings: Settings) -> KeyRing:
        """The configured keys; ConfigError naming serve.api_keys / KB_API_KEYS when there are none."""
        keys = cls.from_settings(settings)
        if not len(keys):
            raise ConfigError(NO_KEYS)
        return keys

    def __len__(self) -> int:
        return len(self._grants)

    def grant(self, key: str | None) -> Grant | None:
        """The key's grant (compared in constant time), or None for an unknown key."""
        if not key:
            return None
        found = None
        for k, g in self._grants.items():
            if hmac.compare_digest(k.encode(), key.encode()):
                found = g
        return found
