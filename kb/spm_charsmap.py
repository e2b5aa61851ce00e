"""A SentencePiece `precompiled_charsmap` built from a per-codepoint replacement map.

The blob is what the `tokenizers` library's `Precompiled` normaliser reads (the same format as
XLM-R's tokenizer.json): a little-endian u32 byte size of a darts-clone double-array trie, the
trie's u32 units, then the NUL-terminated replacement strings. Keys are the UTF-8 bytes of one
codepoint; a key's value is the offset of its replacement in the string pool.

Unit layout (darts-clone): bits 0-7 label, bit 8 has-leaf, bit 9 offset-is-shifted, bits 10-30
offset; a value unit has bit 31 set. A node at position p with offset o has its children at
(p ^ o) ^ label and its value at (p ^ o); every node gets its own base so a label found at a
position always belongs to the node searched from. The array reaches every base's whole block of
256 slots, as the tokenizers library's reader indexes it without bounds checks.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

_MAX_OFFSET = 1 << 21


class _Node:
    __slots__ = ("children", "value")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.value: int | None = None


def _pool(mapping: Mapping[int, str]) -> tuple[bytes, dict[int, int]]:
    """Replacement strings, each once, NUL-terminated; codepoint -> offset in the pool."""
    pool = bytearray()
    where: dict[str, int] = {}
    offsets: dict[int, int] = {}
    for cp, out in sorted(mapping.items()):
        if out not in where:
            where[out] = len(pool)
            pool += out.encode("utf-8") + b"\0"
        offsets[cp] = where[out]
    return bytes(pool), offsets


def _trie(offsets: Mapping[int, int]) -> _Node:
    root = _Node()
    for cp, value in offsets.items():
        if cp <= 0 or cp > 0x10FFFF or 0xD800 <= cp < 0xE000:
            raise ValueError(f"charsmap: codepoint {cp:#x} cannot be a key")
        node = root
        for byte in chr(cp).encode("utf-8"):
            node = node.children.setdefault(byte, _Node())
        node.value = value
    return root


def _free_base(labels: list[int], start: int, used: set[int], bases: set[int]) -> int:
    """The first base from free position `start` on whose slots for `labels` are all free."""
    free = start
    while True:
        if free not in used:
            base = free ^ labels[0]
            if base not in bases and base > 0 and all((base ^ c) not in used for c in labels):
                return base
        free += 1


def _double_array(root: _Node) -> list[int]:
    """Place every node breadth first at the first base whose slots are all free."""
    units: list[int] = [0]
    used = {0}  # occupied positions
    bases: set[int] = set()
    queue: list[tuple[_Node, int]] = [(root, 0)]
    scan = 1
    for node, pos in queue:
        if not node.children and node.value is None:
            continue
        labels = sorted(node.children) + ([0] if node.value is not None else [])
        while scan in used:
            scan += 1
        base = _free_base(labels, scan, used, bases)
        offset = pos ^ base
        if offset >= _MAX_OFFSET:
            raise ValueError("charsmap: the trie is too large for darts offsets")
        bases.add(base)
        need = (base | 0xFF) + 1  # any byte may be looked up from this node: the reader does not bound-check
        if need > len(units):
            units.extend([0] * (need - len(units)))
        units[pos] |= offset << 10
        if node.value is not None:
            units[pos] |= 1 << 8
            units[base] = (1 << 31) | node.value
            used.add(base)
        for c, child in sorted(node.children.items()):
            units[base ^ c] = c
            used.add(base ^ c)
            queue.append((child, base ^ c))
    return units


def lookup(blob: bytes, key: bytes) -> bytes | None:
    """The replacement of `key` (one codepoint's UTF-8) in `blob`; None when it has none.
    The same walk as the tokenizers library's prefix search, kept for tests."""
    (size,) = struct.unpack_from("<I", blob, 0)
    units = struct.unpack_from(f"<{size // 4}I", blob, 4)
    pool = blob[4 + size :]

    def offset(u: int) -> int:
        return (u >> 10) << ((u & (1 << 9)) >> 6)

    pos = offset(units[0])
    found = None
    for c in key:
        pos ^= c
        if pos >= len(units) or units[pos] & ((1 << 31) | 0xFF) != c:
            return found
        unit = units[pos]
        pos ^= offset(unit)
        if (unit >> 8) & 1:
            start = units[pos] & ((1 << 31) - 1)
            found = pool[start : pool.index(b"\0", start)]
    return found


def build_charsmap(mapping: Mapping[int, str]) -> bytes:
    """The precompiled_charsmap blob that replaces each codepoint in `mapping` by its string."""
    pool, offsets = _pool(mapping)
    units = _double_array(_trie(offsets))
    return struct.pack("<I", 4 * len(units)) + struct.pack(f"<{len(units)}I", *units) + pool
