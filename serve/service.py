"""What the HTTP API and the Streamlit app share: open knowledge bases and their answer chains,
once per process."""

from __future__ import annotations

import threading
from functools import cached_property
from pathlib import Path
from typing import BinaryIO

from kb.settings import Settings
from retrieval.knowledge_base import KnowledgeBase, NoSuchKB, list_kbs
from serve.chain import AnswerChain
from serve.compliance import ReplyLibrary
from serve.llm import LLM, OpenAICompatibleLLM, build_llm, pick_backend
from serve.uploads import BadUpload, NoSuchDocument, SavedUpload, remove_upload, save_upload


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
        from retrieval.knowledge_base import shared_embedder

        m, r = self.settings.models, self.settings.retrieval
        return ReplyLibrary.load(self.settings.compliance.approved_replies,
                                 shared_embedder(m.embedder, m.device, r.embed_batch_size))

    def kbs(self) -> list[dict]:
        return list_kbs(self.settings)

    def kb(self, name: str, create: bool = False) -> KnowledgeBase:
        """The open KB `name` (NoSuchKB when it does not exist and `create` is false)."""
        kb = self._kbs.get(name)
        if kb is not None and kb.is_current():  # a store round trip: not under the service's lock
            return kb
        fresh = KnowledgeBase(self.settings, name, create=create)
        with self._lock:
            if self._kbs.get(name) is kb:  # no other thread replaced it meanwhile
                self._kbs[name] = fresh
                self._chains.pop(name, None)
            return self._kbs[name]

    def chain(self, name: str) -> AnswerChain:
        kb = self.kb(name)
        with self._lock:
            ch = self._chains.get(name)
            if ch is None or ch.kb is not kb:
                ch = AnswerChain(self.settings, kb, llm=self.llm, library=self.library)
                self._chains[name] = ch
            return ch

    @property
    def llm_kind(self) -> str:
        """The answer backend, "local", "openai" or "extractive", without loading a model."""
        llm = self.__dict__.get("llm", self._llm)
        if isinstance(llm, str):
            backend = pick_backend(self.settings)
            return backend if backend in ("local", "openai") else "extractive"
        if llm is None:
            return "extractive"
        return "openai" if isinstance(llm, OpenAICompatibleLLM) else "local"

    def upload(self, name: str, files: list[tuple[str | None, BinaryIO]], on_file=None,
               replace: str | None = None) -> dict:
        """Save and ingest uploaded files into KB `name` (created if new); the `kb ingest` JSON.

        Documents are identified by content (an identical re-upload is skipped); a file that fails
        to ingest is not kept and leaves every other document and file as it was. `replace` (a
        doc_id, with exactly one file) removes that document and its file once the new one is in
        the KB (`replaced` in the result); when the new one fails, the old one stays.
        """
        if replace is not None:
            self.check_replace(name, replace, len(files))
        kb = self.kb(name, create=True)
        saved = self.save_all(kb.dir, files)
        try:
            out = kb.add_items([s.item for s in saved], progress=False, on_file=on_file)
        except BaseException:
            self.discard(kb, saved)
            raise
        failed = {f["path"] for f in out["failed"]}
        self.discard(kb, [s for s in saved if str(s.item.path) in failed])
        for f in out["failed"]:  # callers see the file's name, never a server path
            f["path"], f["error"] = Path(f["path"]).name, without_paths(f["error"], f["path"], kb.dir)
        for w in out.get("warnings", []):
            w["path"], w["warning"] = Path(w["path"]).name, without_paths(w["warning"], w["path"], kb.dir)
        if replace is not None and not failed and saved[0].item.doc_id != replace \
                and kb.document(saved[0].item.doc_id) is not None:
            self.remove_document(name, replace)
            out["replaced"] = replace
        return out

    def enqueue(self, name: str, files: list[tuple[str | None, BinaryIO]], replace: str | None = None) -> str:
        """Queue uploaded files for `kb worker` (a shared store); the job's id. Each file is read
        (within serve.max_upload_mb, with a usable name) into the job's transaction in turn: a
        refused one queues nothing."""
        from serve import jobs
        from serve.uploads import read_upload

        if replace is not None:
            self.check_replace(name, replace, len(files))
        limit = int(self.settings.serve.max_upload_mb * 2**20)
        return jobs.enqueue(self.settings.store, name, (read_upload(f, data, limit) for f, data in files), replace)

    def check_replace(self, name: str, doc_id: str, n_files: int) -> None:
        """BadUpload unless one file replaces; NoSuchDocument unless KB `name` has `doc_id`."""
        if n_files != 1:
            raise BadUpload(f"'replace' takes exactly one file ({n_files} sent)")
        try:
            found = self.kb(name).document(doc_id) is not None
        except NoSuchKB:
            found = False
        if not found:
            raise NoSuchDocument(f"no document {doc_id!r} in knowledge base {name!r} to replace")

    def save_all(self, kb_dir: Path, files: list[tuple[str | None, BinaryIO]]) -> list[SavedUpload]:
        """Store every upload, or none: a refused one (too large, bad name) removes those stored before it."""
        limit = int(self.settings.serve.max_upload_mb * 2**20)
        saved: list[SavedUpload] = []
        try:
            for fname, data in files:
                saved.append(save_upload(kb_dir, fname, data, limit))
        except BaseException:
            for s in saved:
                if s.new:
                    remove_upload(kb_dir, str(s.item.path))
            raise
        return saved

    @staticmethod
    def discard(kb: KnowledgeBase, saved: list[SavedUpload]) -> None:
        """Remove the files this upload added that did not become documents."""
        for s in saved:
            if s.new and kb.document(s.item.doc_id) is None:
                remove_upload(kb.dir, str(s.item.path))

    def remove_document(self, name: str, doc_id: str) -> bool:
        kb = self.kb(name)
        doc = kb.document(doc_id)
        if doc is None or not kb.remove_document(doc_id):
            return False
        remove_upload(kb.dir, doc["path"])
        return True

    def delete_kb(self, name: str) -> None:
        kb = self.kb(name)
        kb.delete()  # waits for the KB's write lock: not while holding the service's own lock
        with self._lock:
            self._kbs.pop(name, None)
            self._chains.pop(name, None)


def without_paths(message: str, path: str, kb_dir: Path) -> str:
    """`message` with the upload's server path shown as its file name and the KB folder removed."""
    return message.replace(str(path), Path(path).name).replace(str(kb_dir), "<kb>")

