"""Search: level-1 vector and keyword retrieval, fusion, mapping to level-2 raw text, reranking."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ingest.store import DocStore
from kb.settings import RetrievalConfig

log = logging.getLogger(__name__)


@dataclass
class Hit:
    chunk_id: str | None
    doc_id: str
    source: str
    text: str
    key_info: dict
    score: float
    level: str
    vector_score: float | None = None
    keyword_score: float | None = None
    matched: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"chunk_id": self.chunk_id, "doc_id": self.doc_id, "source": self.source, "text": self.text,
                "key_info": self.key_info, "score": round(float(self.score), 6), "level": self.level,
                "vector_score": None if self.vector_score is None else round(float(self.vector_score), 6),
                "keyword_score": None if self.keyword_score is None else round(float(self.keyword_score), 6)}


def fuse(ranked: Sequence[Sequence[int]], weights: Sequence[float], method: str = "rrf", k: int = 60,
         raw_scores: Sequence[Sequence[float]] | None = None) -> dict[int, float]:
    """Fuse ranked id lists: `rrf` (reciprocal rank), `zscore` (each list's scores standardised over
    its candidates, so a top result that stands out of its list counts more than one in an evenly
    spread list; absent ids get the list's lowest), or `weighted` (max-normalised scores)."""
    out: dict[int, float] = {}
    if method == "zscore":
        assert raw_scores is not None
        all_ids = {i for ids in ranked for i in ids}
        for ids, w, scores in zip(ranked, weights, raw_scores):
            if not ids:
                continue
            arr = np.asarray(scores, dtype=np.float64)
            z = (arr - arr.mean()) / (arr.std() + 1e-9) if len(arr) > 1 else np.ones(1)
            floor = float(z.min()) if len(z) else 0.0
            zs = dict(zip(ids, z.tolist()))
            for id_ in all_ids:
                out[id_] = out.get(id_, 0.0) + w * zs.get(id_, floor)
        return out
    for i, (ids, w) in enumerate(zip(ranked, weights)):
        if method == "rrf":
            for rank, id_ in enumerate(ids):
                out[id_] = out.get(id_, 0.0) + w / (k + rank + 1)
        else:
            scores = list(raw_scores[i]) if raw_scores else [1.0] * len(ids)
            top = max(scores, default=1.0) or 1.0
            for id_, s in zip(ids, scores):
                out[id_] = out.get(id_, 0.0) + w * s / top
    return out


def level2_hits(rows: list[dict], scores: dict[int, float], store: DocStore, cfg: RetrievalConfig,
                vec_scores: dict[int, float], kw_scores: dict[int, float]) -> list[Hit]:
    """Map key-info hits to raw text and merge contained units (sentence ⊂ segment ⊂ article).

    A sentence hit returns its segment ("small to big"); an article hit absorbs the hits inside it
    when the article is at most `max_article_chars` long, else it returns its lead and stands alone.
    """
    small_articles = {r["doc_id"] for r in rows
                      if r["level"] == "article" and len(r["raw_text"]) <= cfg.max_article_chars}
    units: dict[tuple, Hit] = {}
    seg_text: dict[str, str] = {r["chunk_id"]: r["raw_text"] for r in rows if r["level"] == "segment"}
    for r in sorted(rows, key=lambda r: -scores[r["ki_id"]]):
        s = scores[r["ki_id"]]
        level = r["level"]
        if r["doc_id"] in small_articles or level == "article":
            key, unit_level = ("art", r["doc_id"]), "article"
        else:
            key, unit_level = ("seg", r["chunk_id"]), "segment"
        hit = units.get(key)
        if hit is None:
            if unit_level == "article":
                art = r if level == "article" else None
                text = art["raw_text"] if art else None
                chunk_id = None
            else:
                text = seg_text.get(r["chunk_id"])
                chunk_id = r["chunk_id"]
            hit = Hit(chunk_id, r["doc_id"], r["source"], text or "", {}, s, unit_level)
            units[key] = hit
        hit.score = max(hit.score, s)
        hit.matched.append(r["ki_id"])
        if r["ki_id"] in vec_scores:
            hit.vector_score = max(hit.vector_score or -1.0, vec_scores[r["ki_id"]])
        if r["ki_id"] in kw_scores:
            hit.keyword_score = max(hit.keyword_score or 0.0, kw_scores[r["ki_id"]])
        if not hit.key_info or (level == hit.level):
            hit.key_info = {"level": level, "title_path": r["title_path"], "keywords": r["keywords"],
                            "entities": r["entities"], "summary": r["summary"], "key_text": r["key_text"]}
    # fill text the hits themselves did not carry (a segment reached only through its sentences, an article
    # reached only through its parts)
    for (kind, ident), hit in units.items():
        if hit.text:
            continue
        if kind == "seg":
            hit.text = store.conn.execute("SELECT text FROM chunks WHERE chunk_id=?", (ident,)).fetchone()[0]
        else:
            row = store.conn.execute("SELECT raw_text FROM key_infos WHERE doc_id=? AND level='article'",
                                     (ident,)).fetchone()
            hit.text = row[0] if row else "\n\n".join(c["text"] for c in store.chunks(ident))
    for hit in units.values():
        if hit.level == "article" and len(hit.text) > cfg.max_article_chars:
            hit.text = hit.text[: cfg.max_article_chars].rstrip() + "…"
    return sorted(units.values(), key=lambda h: -h.score)


class Reranker:
    """A sentence-transformers CrossEncoder (models.reranker), resolved offline."""

    def __init__(self, spec: str, device: str = "auto") -> None:
        from sentence_transformers import CrossEncoder

        from kb.models import pick_device, resolve_model

        self.model = CrossEncoder(str(resolve_model(spec, "reranker")), device=pick_device(device))

    def scores(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        """The relevance score of each (query, text) pair (a two-label model's last label)."""
        scores = np.asarray(self.model.predict(pairs, show_progress_bar=False))
        return scores[:, -1] if scores.ndim > 1 else scores

    def rerank(self, query: str, hits: list[Hit]) -> list[Hit]:
        if not hits:
            return hits
        scores = self.scores([(query, h.text) for h in hits])
        for h, s in zip(hits, scores):
            h.key_info["rerank_score"] = float(s)
            h.score = float(s)
        return sorted(hits, key=lambda h: -h.score)
