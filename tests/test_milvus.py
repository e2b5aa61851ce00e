"""retrieval.backend: milvus, for real against Milvus Lite: as a local file and as its gRPC server
(`milvus-lite server`), the same code a Milvus cluster is spoken to with."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DOCS, write_files


def milvus_settings(settings, uri: str, **retrieval):
    """`settings` with level 1 in Milvus at `uri`."""
    r = settings.retrieval.model_copy(update={"backend": "milvus", **retrieval})
    return settings.model_copy(update={"retrieval": r, "milvus": settings.milvus.model_copy(update={"uri": uri})})


def top5(kb, questions: list[str]) -> list[list[tuple]]:
    """(doc_id, chunk_id, level) of the top 5 hits of each question."""
    return [[(h.doc_id, h.chunk_id, h.level) for h in hits] for hits in kb.search_many(questions, 5)]


def test_milvus_level1_answers_as_the_embedded_index_does(settings, tmp_path, cmrc_docs):
    """The same KB (same store) searched through FAISS + bm25s and through Milvus (dense + BM25 in
    the engine, the same fusion): the same top 5 for at least 95% of the CMRC questions."""
    from retrieval.knowledge_base import KnowledgeBase

    docs, questions = cmrc_docs
    embedded = KnowledgeBase(settings, "cmrc", create=True)
    embedded.add_paths([docs], progress=False)
    want = top5(embedded, questions)
    assert sum(map(len, want)) > 4 * len(questions)

    kb = KnowledgeBase(milvus_settings(settings, str(tmp_path / "milvus.db")), "cmrc")
    info = kb.sync()
    assert type(kb._index().vectors).__name__ == "MilvusVectors"
    assert info["added"] == info["vectors"] == len(embedded._index().vectors.ids()) > 100
    got = top5(kb, questions)
    same = np.mean([g == w for g, w in zip(got, want)])
    print(f"same top 5: {same:.3f} of {len(questions)} questions")
    assert same >= 0.95
    # BM25 alone scores alike too: the engine counts the same tokens as bm25s (Milvus's scores carry
    # the factor k1 + 1 that Lucene's form drops); ties at the cut may pick different members
    live, mine = kb._index(), embedded._index()
    for q in questions:
        a, b = live.keywords.search(q, 5), mine.keywords.search(q, 5)
        assert bool(a) == bool(b), q
        if a:
            assert above_last_tie(a, 1 / 2.5) == above_last_tie(b, 1.0), (q, a, b)


def above_last_tie(hits: list[tuple[int, float]], scale: float) -> dict[float, set[int]]:
    """{score: ids} of a ranked list, scores scaled, without the lowest score's group."""
    groups: dict[float, set[int]] = {}
    for i, sc in hits:
        groups.setdefault(round(sc * scale, 3), set()).add(i)
    groups.pop(min(groups))
    return groups


def test_deletes_updates_and_rebuilds_keep_milvus_equal_to_the_store(settings, tmp_path):
    """Removing a document deletes its rows; adding one inserts only its rows; a reindex fills a new
    generation and moves the alias; deleting the KB drops its collections."""
    from retrieval.knowledge_base import KnowledgeBase
    from retrieval.milvus import present_ids

    s = milvus_settings(settings, str(tmp_path / "milvus.db"))
    kb = KnowledgeBase(s, "pol-icy.v1", create=True)
    items = write_files(tmp_path / "d", DOCS)
    kb.add_items(items[:3], progress=False)
    level1 = kb.milvus()
    gen = level1.current()
    assert gen == "kb_pol_dicy_pv1_g1" and kb.stats()["index_generation"] == gen

    def store_ids() -> list[int]:
        with kb.store() as st:
            return sorted(r[0] for r in st.conn.execute("SELECT ki_id FROM key_infos"))

    assert store_ids() == present_ids(level1.client, gen, level1.t).tolist()
    added = kb.add_items(items[3:], progress=False)
    assert added["index"]["added"] > 0 and added["index"]["removed"] == 0
    assert kb.search("年假需要提前多久申请", 3)[0].source == "zh.txt"
    assert kb.remove_document(items[0].doc_id)
    assert store_ids() == present_ids(level1.client, gen, level1.t).tolist()
    assert all(h.doc_id != items[0].doc_id for h in kb.search("refund within 30 days", 5))

    info = kb.reindex()
    assert info["generation"] == "kb_pol_dicy_pv1_g2" == level1.current()
    assert level1.generations() == ["kb_pol_dicy_pv1_g1", "kb_pol_dicy_pv1_g2"]  # g1 kept for readers still on it
    kb.reindex()
    assert level1.generations() == ["kb_pol_dicy_pv1_g2", "kb_pol_dicy_pv1_g3"]
    assert kb.search("How long does express delivery take?", 1)[0].source == "shipping.md"
    kb.delete()
    assert level1.current() is None and level1.generations() == []


def test_a_rebuild_killed_before_its_publish_is_swept_by_the_next_sync(settings, tmp_path):
    from retrieval.knowledge_base import KnowledgeBase

    s = milvus_settings(settings, str(tmp_path / "milvus.db"))
    kb = KnowledgeBase(s, "policies", create=True)
    kb.add_items(write_files(tmp_path / "d", DOCS), progress=False)
    level1 = kb.milvus()
    live = level1.current()
    orphan = level1.create({**level1.meta(live), "kind": "flat"}, s.retrieval)  # the kill: never published
    assert level1.generations() == [live, orphan]
    assert kb.sync()["unchanged"] and level1.generations() == [live]


def test_generations_built_before_data_folders_had_ids_are_adopted(settings, tmp_path):
    """A generation whose owner is the KB folder's path (how the first release recorded it) and
    whose store is this KB's is searched, and the next sync rebuilds it under the folder's id."""
    from retrieval.knowledge_base import KnowledgeBase

    s = milvus_settings(settings, str(tmp_path / "milvus.db"))
    kb = KnowledgeBase(s, "policies", create=True)
    kb.add_items(write_files(tmp_path / "d", DOCS), progress=False)
    level1 = kb.milvus()
    live = level1.current()
    level1.set_meta(live, {**level1.meta(live), "owner": str(kb.dir.resolve())})
    fresh = KnowledgeBase(s, "policies")
    assert fresh.search("refund within 30 days", 1)[0].source == "refunds.md"
    info = fresh.sync()
    assert not info["unchanged"] and level1.meta(level1.current())["owner"] == level1.owner


def test_another_embedder_is_refused_until_reindexed(settings, tmp_path, monkeypatch):
    from retrieval.index import IndexMismatchError
    from retrieval.knowledge_base import KnowledgeBase

    s = milvus_settings(settings, str(tmp_path / "milvus.db"))
    kb = KnowledgeBase(s, "policies", create=True)
    kb.add_items(write_files(tmp_path / "d", DOCS), progress=False)
    meta = kb.milvus().meta(kb.milvus().current())
    kb.milvus().set_meta(kb.milvus().current(), {**meta, "embedder": "another-model"})
    fresh = KnowledgeBase(s, "policies")
    with pytest.raises(IndexMismatchError, match="kb reindex"):
        fresh.search("refund", 3)
    fresh.reindex()
    assert fresh.search("refund within 30 days", 1)[0].source == "refunds.md"


def test_a_milvus_server_is_shared_by_every_process_that_points_at_it(settings, tmp_path, milvus_server):
    """Through the gRPC server: one process ingests, another (a fresh interpreter with the same
    config) searches and gets the same hits; nothing is in the KB folder's index."""
    from retrieval.knowledge_base import KnowledgeBase

    s = milvus_settings(settings, milvus_server)
    kb = KnowledgeBase(s, "policies", create=True)
    kb.add_items(write_files(tmp_path / "d", DOCS), progress=False)
    assert not (kb.dir / "index").exists()
    here = [(h.doc_id, h.chunk_id) for h in kb.search("How long does express delivery take?", 3)]
    assert here and kb.search("How long does express delivery take?", 1)[0].source == "shipping.md"
    nsp = str(settings.models.nsp)
    code = (
        "import json, sys\n"
        "from kb.settings import load_settings\n"
        "from retrieval.knowledge_base import KnowledgeBase\n"
        f"s = load_settings(None, **{{'retrieval.backend': 'milvus', 'milvus.uri': {milvus_server!r}, "
        f"'models.device': 'cpu', 'models.llm': None, 'llm.adapter': None, 'models.nsp': {nsp!r}}})\n"
        "kb = KnowledgeBase(s, 'policies')\n"
        "print(json.dumps([[h.doc_id, h.chunk_id] for h in kb.search('How long does express delivery take?', 3)]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [tuple(x) for x in json.loads(out.stdout.strip().splitlines()[-1])] == here


def test_kb_migrate_moves_a_kb_to_milvus_and_back_verified(settings, tmp_path, capsys, monkeypatch):
    """`kb migrate`: FAISS -> Milvus (same data folder) and Milvus -> FAISS in another data folder,
    each verified by counts and by the top 5 of sampled queries; a migration onto itself is refused."""
    from cli.main import main as kb_main
    from kb.settings import load_settings_as_written
    from retrieval.knowledge_base import KnowledgeBase

    kb = KnowledgeBase(settings, "policies", create=True)
    kb.add_items(write_files(tmp_path / "d", DOCS), progress=False)
    home = settings.home  # KB_HOME stays set: the target files' own home must win over it
    base = tmp_path / "faiss.yaml"
    base.write_text(f"home: {home}\nmodels: {{nsp: {settings.models.nsp}, device: cpu, llm: null}}\n")
    to_milvus = tmp_path / "milvus.yaml"
    to_milvus.write_text(f"extends: {base}\nretrieval: {{backend: milvus}}\nmilvus: {{uri: {tmp_path / 'm.db'}}}\n")
    assert kb_main(["migrate", "--kb", "policies", "--config", str(base), "--to", str(to_milvus), "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (r["from"], r["to"]) == ("faiss", "milvus") and r["same_top5"] >= 0.95 and r["queries"] > 5
    assert r["vectors"]["source"] == r["vectors"]["target"] > 0 and r["source"] == r["target"]

    back = tmp_path / "faiss2.yaml"
    back.write_text(f"home: {tmp_path / 'home2'}\nmodels: {{nsp: {settings.models.nsp}, device: cpu, llm: null}}\n"
                    "retrieval: {backend: faiss}\n")
    assert kb_main(["migrate", "--kb", "policies", "--config", str(to_milvus), "--to", str(back),
                    "--min-agreement", "1.01"]) == 2  # a failed copy into another data folder leaves nothing
    assert "agrees on the top 5" in capsys.readouterr().err
    left = tmp_path / "home2" / "policies"
    assert not (left / "store.sqlite").exists() and not (left / "index" / "CURRENT").exists()
    assert kb_main(["migrate", "--kb", "policies", "--config", str(to_milvus), "--to", str(back), "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (r["from"], r["to"]) == ("milvus", "faiss") and r["same_top5"] >= 0.95
    assert (tmp_path / "home2" / "policies" / "store.sqlite").is_file()
    level1 = KnowledgeBase(load_settings_as_written(to_milvus), "policies").milvus()
    live = level1.current()
    assert kb_main(["migrate", "--kb", "policies", "--config", str(base), "--to", str(to_milvus),
                    "--min-agreement", "1.01"]) == 2  # cannot pass: the new generation must not stand
    assert "agrees on the top 5" in capsys.readouterr().err
    assert level1.current() == live and level1.generations()[-1] == live
    assert kb_main(["migrate", "--kb", "policies", "--config", str(to_milvus), "--to", str(to_milvus)]) == 2
    assert "same place" in capsys.readouterr().err
    assert kb_main(["migrate", "--kb", "policies", "--config", str(to_milvus), "--to", str(back)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_a_new_kb_of_a_deleted_name_never_searches_the_old_rows(settings, tmp_path, monkeypatch):
    """A delete killed before it dropped the collections leaves them behind; they record the old
    store, so the new KB of that name rebuilds instead of diffing its (restarted) ids against them."""
    from retrieval.knowledge_base import KnowledgeBase
    from retrieval.milvus import MilvusLevel1

    s = milvus_settings(settings, str(tmp_path / "milvus.db"))
    old = KnowledgeBase(s, "pol", create=True)
    old.add_items(write_files(tmp_path / "a", {k: DOCS[k] for k in ("refunds.md", "shipping.md")}), progress=False)
    with monkeypatch.context() as m:
        m.setattr(MilvusLevel1, "drop", lambda self: (_ for _ in ()).throw(ConnectionError("Milvus down")))
        old.delete()  # the KB is gone; its collections stay (logged)
    assert not old.dir.exists() and old.milvus().current() == "kb_pol_g1"
    new = KnowledgeBase(s, "pol", create=True)
    items = write_files(tmp_path / "b", {"tax.md": "# Tax\n\nThe tax return is due on 31 July.",
                                         "cats.md": "# Cats\n\nCats sleep sixteen hours a day."})
    with monkeypatch.context() as m:  # its first sync fails: its store is written, the old rows are not read
        m.setattr("retrieval.milvus.sync_milvus", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("down")))
        with pytest.raises(ConnectionError):
            new.add_items(items, progress=False)
    assert new.stats()["documents"] == 2 and new.search("refund within 30 days", 5) == []
    info = new.sync()
    assert info["generation"] == "kb_pol_g2" and not info["unchanged"] and info["added"] > 0
    assert {h.source for h in new.search("When is the tax return due?", 5)} <= {"tax.md", "cats.md"}
    assert new.search("When is the tax return due?", 1)[0].source == "tax.md"


def test_kbs_whose_names_look_like_generations_stay_apart(settings, tmp_path):
    from retrieval.knowledge_base import KnowledgeBase

    s = milvus_settings(settings, str(tmp_path / "milvus.db"))
    a, b = KnowledgeBase(s, "a", create=True), KnowledgeBase(s, "a_g1", create=True)
    items = write_files(tmp_path / "d", DOCS)
    a.add_items(items[:1], progress=False)
    b.add_items(items[1:2], progress=False)
    assert a.milvus().generations() == ["kb_a_g1"] and b.milvus().generations() == ["kb_a__g1_g1"]
    a.reindex()
    a.reindex()
    assert b.milvus().current() == "kb_a__g1_g1" and b.search("express delivery", 1)[0].source == "shipping.md"


def test_another_data_folder_cannot_take_over_a_kb_of_the_same_name(settings, tmp_path):
    from retrieval.knowledge_base import KnowledgeBase
    from retrieval.milvus import NotThisKB

    s = milvus_settings(settings, str(tmp_path / "shared.db"))
    KnowledgeBase(s, "policies", create=True).add_items(write_files(tmp_path / "d", DOCS), progress=False)
    other = s.model_copy(update={"home": tmp_path / "other-home"})
    intruder = KnowledgeBase(other, "policies", create=True)
    with pytest.raises(NotThisKB, match="collection_prefix"):
        intruder.add_items(write_files(tmp_path / "e", DOCS), progress=False)
    assert intruder.search("refund within 30 days", 3) == []  # never the other folder's rows
    intruder.delete()  # leaves the other folder's collections alone
    assert KnowledgeBase(s, "policies").search("refund within 30 days", 1)[0].source == "refunds.md"
    mine = other.model_copy(update={"milvus": other.milvus.model_copy(update={"collection_prefix": "other_"})})
    KnowledgeBase(mine, "policies", create=True).add_items(write_files(tmp_path / "e", DOCS), progress=False)
    assert KnowledgeBase(s, "policies").milvus().current() == "kb_policies_g1"


def test_configured_milvus_settings_reach_every_request(settings, tmp_path, monkeypatch):
    """milvus.timeout_s on every call, milvus.insert_batch per insert, the credentials from the
    variable milvus.token_env names, milvus.db_name and the prefix on the client and collections."""
    import pymilvus

    import retrieval.milvus as rm
    from retrieval.knowledge_base import KnowledgeBase

    made, calls = [], []
    real = pymilvus.MilvusClient

    class Recording:
        def __init__(self, **kw):
            made.append(kw)
            self.inner = real(uri=kw["uri"])

        def __getattr__(self, name):
            attr = getattr(self.inner, name)
            if not callable(attr):
                return attr

            def call(*a, **kw):
                calls.append((name, kw.get("timeout"), len(a[1]) if name == "insert" else None))
                return attr(*a, **kw)
            return call

    monkeypatch.setattr(pymilvus, "MilvusClient", Recording)
    monkeypatch.setattr(rm, "_CLIENTS", {})
    monkeypatch.setenv("MY_MILVUS_TOKEN", "root:secret")
    m = settings.milvus.model_copy(update={"uri": str(tmp_path / "m.db"), "timeout_s": 7.5, "insert_batch": 3,
                                           "token_env": "MY_MILVUS_TOKEN", "db_name": "", "collection_prefix": "t_"})
    s = milvus_settings(settings, m.uri).model_copy(update={"milvus": m})
    kb = KnowledgeBase(s, "policies", create=True)
    kb.add_items(write_files(tmp_path / "d", DOCS), progress=False)
    kb.search("refund", 3)
    assert made == [{"uri": m.uri, "timeout": 7.5, "token": "root:secret"}]
    requests = [c for c in calls if c[0] not in ("create_schema", "prepare_index_params")]  # built locally
    assert requests and all(t == 7.5 for _, t, _ in requests), [c for c in requests if c[1] != 7.5]
    inserts = [n for name, _, n in calls if name == "insert"]
    assert max(inserts) == 3 and sum(inserts) == kb.vector_count() > 3
    assert kb.milvus().current() == "t_policies_g1"
    monkeypatch.setattr(rm, "_CLIENTS", {})
    s2 = s.model_copy(update={"milvus": m.model_copy(update={"db_name": "hr"})})
    KnowledgeBase(s2, "policies").milvus()
    assert made[-1] == {"uri": m.uri, "timeout": 7.5, "token": "root:secret", "db_name": "hr"}


def test_milvus_settings_are_checked_before_any_request(settings, tmp_path, monkeypatch):
    from pydantic import ValidationError

    from kb.settings import MilvusConfig
    from retrieval.knowledge_base import KnowledgeBase
    from retrieval.milvus import MilvusUnavailable

    for bad in ({"collection_prefix": "9x"}, {"collection_prefix": "a-b"}, {"insert_batch": 0}, {"timeout_s": 0}):
        with pytest.raises(ValidationError):
            MilvusConfig(**bad)
    monkeypatch.delenv("NO_SUCH_MILVUS_TOKEN", raising=False)
    s = milvus_settings(settings, str(tmp_path / "m2.db"))
    s = s.model_copy(update={"milvus": s.milvus.model_copy(update={"token_env": "NO_SUCH_MILVUS_TOKEN"})})
    with pytest.raises(MilvusUnavailable, match="NO_SUCH_MILVUS_TOKEN"):
        KnowledgeBase(s, "policies", create=True).milvus()


def test_an_edit_inserts_the_new_rows_before_it_deletes_the_old(settings, tmp_path, monkeypatch):
    """A chunk edit replaces key-information entries: the sync inserts the new rows first, so a
    search meanwhile finds the old text or the new one, never neither."""
    from retrieval.knowledge_base import KnowledgeBase
    from retrieval.milvus import MilvusLevel1

    s = milvus_settings(settings, str(tmp_path / "milvus.db"))
    kb = KnowledgeBase(s, "policies", create=True)
    items = write_files(tmp_path / "d", DOCS)
    kb.add_items(items, progress=False)
    calls: list[str] = []

    def recording(name: str):
        real = getattr(MilvusLevel1, name)

        def call(self, *a, **k):
            calls.append(name)
            return real(self, *a, **k)
        return call

    for name in ("insert", "delete"):
        monkeypatch.setattr(MilvusLevel1, name, recording(name))
    doc = next(i.doc_id for i in items if i.source == "refunds.md")
    info = kb.edit_chunk(doc, 0, "Refunds: customers can return a product within 60 days.", "tester")["index"]
    assert info["added"] > 0 and info["removed"] > 0 and calls == ["insert", "delete"]
    assert "60 days" in kb.search("within how many days can a product be returned?", 1)[0].text
