"""What the HTTP API and the Streamlit app share: open knowledge bases and their answer chains,
once per process."""

from __future__ import annotations

import threading
from functools import cached_property
from pathlib import Path
from typing import BinaryIO

from kb.settings import Settings
from retrieval.kb import KnowledgeBase, NoSuchKB, list_kbs
from serve.chain import AnswerChain
from serve.compliance import ReplyLibrary
from serve.llm import LLM, build_llm
from serve.uploads import remove_upload, save_upload


class Service:
    def __init__(self, settings: Settings, llm: LLM | None | str = "config") -> None:
        self.settings = settings
        self._llm = llm
        self._kbs: dict[str, KnowledgeBase] = {}
        self._chains: dict[str, AnswerChain] = {}
        self._lock = threading.Lock()

    @cached_property
    def llm(self) -> LLM | None:
        return build_llm(self.settings) if self._llm == "config" else self._llm  # type: ignore[return-value]

    @cached_property
    def library(self) -> ReplyLibrary:
        from retrieval.kb import shared_embedder

        m, r = self.settings.models, self.settings.retrieval
        return ReplyLibrary.load(self.settings.compliance.approved_replies,
                                 shared_embedder(m.embedder, m.device, r.embed_batch_size))

    def kbs(self) -> list[dict]:
        return list_kbs(self.settings)

    def kb(self, name: str, create: bool = False) -> KnowledgeBase:
        """The open KB `name` (NoSuchKB when it does not exist and `create` is false)."""
        with self._lock:
            kb = self._kbs.get(name)
            if kb is None or not (kb.dir / "store.sqlite").is_file():
                kb = KnowledgeBase(self.settings, name, create=create)
                self._kbs[name] = kb
                self._chains.pop(name, None)
            return kb

    def chain(self, name: str) -> AnswerChain:
        kb = self.kb(name)
        with self._lock:
            ch = self._chains.get(name)
            if ch is None or ch.kb is not kb:
                ch = AnswerChain(self.settings, kb, llm=self.llm, library=self.library)
                self._chains[name] = ch
            return ch

    def upload(self, name: str, files: list[tuple[str | None, BinaryIO]], on_file=None) -> dict:
        """Save and ingest uploaded files into KB `name` (created if new); the `kb ingest` JSON."""
        kb = self.kb(name, create=True)
        limit = int(self.settings.serve.max_upload_mb * 2**20)
        items = [save_upload(kb.dir, fname, data, limit) for fname, data in files]
        out = kb.add_items(items, progress=False, on_file=on_file)
        for f in out["failed"]:  # an unreadable upload is not kept; callers see its name, not a server path
            remove_upload(kb.dir, f["path"])
            f["path"] = Path(f["path"]).name
        return out

    def remove_document(self, name: str, doc_id: str) -> bool:
        kb = self.kb(name)
        doc = kb.document(doc_id)
        if doc is None or not kb.remove_document(doc_id):
            return False
        remove_upload(kb.dir, doc["path"])
        return True

    def delete_kb(self, name: str) -> None:
        kb = self.kb(name)
        with self._lock:
            kb.delete()
            self._kbs.pop(name, None)
            self._chains.pop(name, None)


