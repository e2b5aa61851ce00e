"""Key information for each article, segment and sentence: title path, keywords, entities, summary.

The default method is extractive and CPU-cheap: jieba TF-IDF keywords and part-of-speech proper
nouns for Chinese; RAKE-style keyphrases and spaCy's packaged English NER for English; summaries
are the most central sentences (TextRank-like degree centrality) in document order.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from functools import cache, lru_cache
from typing import Protocol

from ingest.sentences import is_chinese, split_sentences
from ingest.text import en_stopwords
from ingest.types import Chunk, KeyInfo, ParsedDocument

log = logging.getLogger(__name__)

_WORD = re.compile(r"[A-Za-z][A-Za-z0-9'&.-]*[A-Za-z0-9]|[A-Za-z]")
_ZH_ENTITY_FLAGS = {"nr", "nrt", "nrfg", "ns", "nt", "nz", "nrf"}
_ZH_STOP = set("的了和是在与及或等对中为以于上下其这那之也并而被将从由到个有一不")  # one-character stop words


@cache
def _jieba():
    import jieba
    import jieba.analyse  # noqa: F401
    import jieba.posseg  # noqa: F401

    jieba.setLogLevel(logging.WARNING)
    return jieba


@cache
def _spacy_ner():
    """spaCy's packaged English pipeline with NER only, or None when it is not installed."""
    try:
        import spacy

        from ingest.loaders import point_unstructured_at_packaged_spacy_model

        point_unstructured_at_packaged_spacy_model()
        import unstructured.nlp.tokenize as tok

        return spacy.load(tok._SPACY_MODEL_NAME, exclude=["parser", "lemmatizer", "senter"])
    except Exception as e:  # noqa: BLE001
        log.warning("spaCy NER unavailable (%s); English entities use capitalised phrases", e)
        return None


BLOCK_CACHE = 8192
"""Blocks (runs of Han characters and alphanumerics) whose jieba cut each process keeps."""
BLOCK_CACHE_CHARS = 256
"""Longer blocks (OCR text without punctuation, say) are cut without being kept."""


class _CachedCuts:
    """jieba's cuts, computed block by block with each block's words kept: jieba cuts a text
    block by block (`Tokenizer.cut`, `POSTokenizer.cut` split on their block regexes and cut each
    block on its own), so the concatenation is exactly jieba's result, and an article, its
    segments and its sentences (and BM25 over their key text) cut each block once."""

    def __init__(self) -> None:
        jieba = _jieba()
        self._re_words = jieba.re_han_default
        self._re_tagged = jieba.posseg.re_han_internal
        self._cut_words = lambda blk: tuple(jieba.dt.cut(blk))
        self._cut_tagged = lambda blk: tuple((p.word, p.flag) for p in jieba.posseg.dt.cut(blk))
        self._words = lru_cache(BLOCK_CACHE)(self._cut_words)
        self._tagged = lru_cache(BLOCK_CACHE)(self._cut_tagged)

    def cut(self, text: str) -> list[str]:
        """`jieba.lcut(text)`; also the tokenizer of `_tfidf()` (TFIDF.extract_tags calls `cut`)."""
        return [w for blk in self._re_words.split(text) if blk
                for w in (self._words(blk) if len(blk) <= BLOCK_CACHE_CHARS else self._cut_words(blk))]

    def tagged(self, text: str) -> list[tuple[str, str]]:
        """`list(jieba.posseg.cut(text))` as (word, flag) tuples."""
        return [p for blk in self._re_tagged.split(text) if blk
                for p in (self._tagged(blk) if len(blk) <= BLOCK_CACHE_CHARS else self._cut_tagged(blk))]


@cache
def _cuts() -> _CachedCuts:
    return _CachedCuts()


@cache
def _tfidf():
    """jieba's default TF-IDF keyword extractor (its IDF table and stopwords) over the cached cuts."""
    import copy

    tfidf = copy.copy(_jieba().analyse.default_tfidf)
    tfidf.tokenizer = _cuts()
    return tfidf


def tokens(text: str) -> list[str]:
    """Content words: jieba words for Chinese, lower-cased non-stopwords for English."""
    if is_chinese(text):
        return [w for w in _cuts().cut(text) if len(w.strip()) > 1 and w not in _ZH_STOP]
    stop = en_stopwords()
    return [w.lower() for w in _WORD.findall(text) if w.lower() not in stop and len(w) > 1]


def keywords(text: str, k: int = 8) -> list[str]:
    """Up to `k` keywords of the text: jieba TF-IDF for Chinese, RAKE phrases otherwise."""
    if not text.strip() or k <= 0:
        return []
    if is_chinese(text):
        return list(_tfidf().extract_tags(text, topK=k))
    return _rake(text, k)


def _rake(text: str, k: int) -> list[str]:
    """RAKE: phrases between stopwords, scored by the sum of word degree/frequency."""
    stop = en_stopwords()
    phrases: list[list[str]] = []
    for sent in re.split(r"[.!?,;:()\[\]\"\n|]+", text):
        cur: list[str] = []
        for w in _WORD.findall(sent):
            lw = w.lower()
            if lw in stop or len(lw) < 2 or lw.isdigit():
                if cur:
                    phrases.append(cur)
                cur = []
            else:
                cur.append(lw)
        if cur:
            phrases.append(cur)
    phrases = [p[:4] for p in phrases]
    freq: Counter[str] = Counter()
    degree: Counter[str] = Counter()
    for p in phrases:
        for w in p:
            freq[w] += 1
            degree[w] += len(p)
    scored: dict[str, float] = {}
    for p in phrases:
        phrase = " ".join(p)
        scored[phrase] = max(scored.get(phrase, 0.0), sum(degree[w] / freq[w] for w in p))
    ranked = sorted(scored.items(), key=lambda kv: (-kv[1], kv[0]))
    return [p for p, _ in ranked[:k]]


def entities(text: str, k: int = 10) -> list[str]:
    """Up to `k` named entities of the text, most frequent first (jieba tags, spaCy NER or capitalised runs)."""
    if not text.strip() or k <= 0:
        return []
    found: Counter[str] = Counter()
    if is_chinese(text):
        for w, flag in _cuts().tagged(text):
            if flag in _ZH_ENTITY_FLAGS and len(w) > 1:
                found[w] += 1
    else:
        nlp = _spacy_ner()
        if nlp is not None:
            for ent in nlp(text[:20000]).ents:
                if ent.label_ not in {"CARDINAL", "ORDINAL", "QUANTITY", "PERCENT"}:
                    found[ent.text.strip()] += 1
        else:
            for m in re.finditer(r"(?<![.!?]\s)\b([A-Z][a-z]+(?:\s+[A-Z][a-z]+)+)", text):
                found[m.group(1)] += 1
    return [e for e, _ in found.most_common(k)]


def summarize(sentences: Sequence[str], n: int = 2, max_chars: int = 300) -> str:
    """The `n` most central sentences, in document order, cut to `max_chars`."""
    sents = [s for s in sentences if s.strip()]
    if not sents:
        return ""
    if len(sents) <= n:
        chosen = sents
    else:
        bags = [set(tokens(s)) for s in sents]
        scores = []
        for i, bi in enumerate(bags):
            sim = sum(len(bi & bj) / (1 + len(bi) + len(bj)) ** 0.5 for j, bj in enumerate(bags) if j != i)
            scores.append(sim + (0.5 if i == 0 else 0.0))  # the lead sentence often states the topic
        top = sorted(sorted(range(len(sents)), key=lambda i: -scores[i])[:n])
        chosen = [sents[i] for i in top]
    joiner = "" if is_chinese(chosen[0]) else " "
    text = joiner.join(chosen)
    return text if len(text) <= max_chars else text[: max_chars - 1].rstrip() + "…"


class KeyInfoExtractor(Protocol):
    def extract(self, doc: ParsedDocument, chunks: list[Chunk]) -> list[KeyInfo]: ...


def article_text(chunks: list[str], min_overlap: int = 10) -> str:
    """The chunks joined by blank lines, except where a chunk starts with the end of the one before
    (the overlap of a fixed-size splitter): that start is dropped and the text runs on, so an
    article's text holds every passage once and in one piece."""
    text = ""
    for chunk in chunks:
        cut = next((n for n in range(min(len(text), len(chunk)) - 1, min_overlap - 1, -1)
                    if text.endswith(chunk[:n])), 0)
        if cut:
            text += chunk[cut:]
        elif chunk:
            text = f"{text}\n\n{chunk}" if text else chunk
    return text


class ExtractiveKeyInfo:
    """The default extractor (CPU, no model downloads)."""

    def __init__(self, n_keywords: int = 8, n_entities: int = 10, summary_sentences: int = 2,
                 summary_max_chars: int = 300, sentence_level: bool = True,
                 min_sentence_chars: int = 12) -> None:
        self.k = n_keywords
        self.e = n_entities
        self.n_sum = summary_sentences
        self.sum_chars = summary_max_chars
        self.sentence_level = sentence_level
        self.min_sentence_chars = min_sentence_chars

    def extract(self, doc: ParsedDocument, chunks: list[Chunk]) -> list[KeyInfo]:
        out: list[KeyInfo] = []
        full = article_text([c.text for c in chunks])
        all_sents = [s for c in chunks for s in (c.sentences or split_sentences(c.text))]
        title = doc.title
        art = KeyInfo("article", "", full, None, 0, (title,) if title else (),
                      keywords(full, self.k), entities(full, self.e),
                      summarize(all_sents, self.n_sum + 1, self.sum_chars))
        art.key_text = compose(art, title)
        out.append(art)
        for c in chunks:
            path = c.title_path or ((title,) if title else ())
            seg = KeyInfo("segment", "", c.text, c.ord, c.ord, path, keywords(c.text, self.k),
                          entities(c.text, self.e),
                          summarize(c.sentences or split_sentences(c.text), self.n_sum, self.sum_chars))
            seg.key_text = compose(seg, title)
            out.append(seg)
            if not self.sentence_level or len(c.sentences) < 2:
                continue  # a one-sentence segment is its own sentence entry
            for j, s in enumerate(c.sentences):
                if len(s) < self.min_sentence_chars:
                    continue
                ki = KeyInfo("sentence", "", s, c.ord, j, path, keywords(s, 4), [])
                ki.key_text = compose(ki, title)
                out.append(ki)
        return out


def compose(ki: KeyInfo, doc_title: str = "") -> str:
    """The text level 1 embeds for one key-info entry."""
    head = " > ".join(ki.title_path) or doc_title
    parts = [head] if head else []
    if ki.level == "sentence":
        parts.append(ki.raw_text)
    else:
        if ki.summary:
            parts.append(ki.summary)
        if ki.keywords:
            parts.append("; ".join(ki.keywords))
        if ki.entities:
            parts.append("; ".join(ki.entities))
    return "\n".join(parts)


def build_extractor(cfg) -> KeyInfoExtractor:
    """The extractor the config names (`keyinfo.method`)."""
    if cfg.method == "extractive":
        return ExtractiveKeyInfo(cfg.keywords, cfg.entities, cfg.summary_sentences,
                                 cfg.summary_max_chars, cfg.sentence_level, cfg.min_sentence_chars)
    raise ValueError(f"unknown keyinfo.method {cfg.method!r}")
