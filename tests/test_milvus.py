"""retrieval.backend: milvus, for real against Milvus Lite: as a local file and as its gRPC server
(`milvus-lite server`), the same code a Milvus cluster is spoken to with."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import CMRC, DOCS, free_port, write_files

pytest.importorskip("pymilvus")


def milvus_settings(settings, uri: str, **retrieval):
    """`settings` with level 1 in Milvus at `uri`."""
    r = settings.retrieval.model_copy(update={"backend": "milvus", **retrieval})
    return settings.model_copy(update={"retrieval": r, "milvus": settings.milvus.model_copy(update={"uri": uri})})


def top5(kb, questions: list[str]) -> list[list[tuple]]:
    """(doc_id, chunk_id, level) of the top 5 hits of each question."""
    return [[(h.doc_id, h.chunk_id, h.level) for h in hits] for hits in kb.search_many(questions, 5)]


@pytest.fixture(scope="module")
def cmrc_docs(tmp_path_factory) -> tuple[Path, list[str]]:
    """The first 12 CMRC 2018 articles as documents, and their questions."""
    from eval.squad_docs import write_docs

    root = tmp_path_factory.mktemp("cmrc_milvus")
    data = json.loads(CMRC.read_text(encoding="utf-8"))
    data["data"] = data["data"][:12]
    squad = root / "cmrc12.json"
    squad.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    write_docs(squad, root / "docs")
    questions = [q["question"] for a in data["data"] for p in a["paragraphs"] for q in p["qas"]]
    return root / "docs", questions


def test_milvus_level1_answers_as_the_embedded_index_does(settings, tmp_path, cmrc_docs):
    """The same KB (same store) searched through FAISS + bm25s and through Milvus (dense + BM25 in
    the engine, the same fusion): the same top 5 for at least 95% of the CMRC questions."""
    from retrieval.kb import KnowledgeBase

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
    # BM25 alone ranks alike too: the engine counts the same tokens as bm25s
    live, mine = kb._index(), embedded._index()
    for q in questions[:20]:
        assert [i for i, _ in live.keywords.search(q, 5)] == [i for i, _ in mine.keywords.search(q, 5)], q


def test_deletes_updates_and_rebuilds_keep_milvus_equal_to_the_store(settings, tmp_path):
    """Removing a document deletes its rows; adding one inserts only its rows; a reindex fills a new
    generation and moves the alias; deleting the KB drops its collections."""
    from retrieval.kb import KnowledgeBase
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

    assert store_ids() == present_ids(level1.client, gen).tolist()
    added = kb.add_items(items[3:], progress=False)
    assert added["index"]["added"] > 0 and added["index"]["removed"] == 0
    assert kb.search("年假需要提前多久申请", 3)[0].source == "zh.txt"
    assert kb.remove_document(items[0].doc_id)
    assert store_ids() == present_ids(level1.client, gen).tolist()
    assert all(h.doc_id != items[0].doc_id for h in kb.search("refund within 30 days", 5))

    info = kb.reindex()
    assert info["generation"] == "kb_pol_dicy_pv1_g2" == level1.current()
    assert level1.generations() == ["kb_pol_dicy_pv1_g2"]
    assert kb.search("How long does express delivery take?", 1)[0].source == "shipping.md"
    kb.delete()
    assert level1.current() is None and level1.generations() == []


def test_another_embedder_is_refused_until_reindexed(settings, tmp_path, monkeypatch):
    from retrieval.index import IndexMismatchError
    from retrieval.kb import KnowledgeBase

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


@pytest.fixture()
def milvus_server(tmp_path):
    """`milvus-lite server` on a free loopback port; yields its URI."""
    exe = shutil.which("milvus-lite") or str(Path(sys.executable).parent / "milvus-lite")
    port = free_port()
    proc = subprocess.Popen([exe, "server", "--data-dir", str(tmp_path / "milvus-data"), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        from pymilvus import MilvusClient

        deadline = time.time() + 60
        while True:
            try:
                MilvusClient(uri=uri, timeout=2).list_collections()
                break
            except Exception:  # noqa: BLE001
                assert proc.poll() is None and time.time() < deadline, "milvus-lite server did not start"
                time.sleep(0.3)
        yield uri
    finally:
        proc.kill()
        proc.wait(10)


def test_a_milvus_server_is_shared_by_every_process_that_points_at_it(settings, tmp_path, milvus_server):
    """Through the gRPC server: one process ingests, another (a fresh interpreter with the same
    config) searches and gets the same hits; nothing is in the KB folder's index."""
    from retrieval.kb import KnowledgeBase

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
        "from retrieval.kb import KnowledgeBase\n"
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
    from retrieval.kb import KnowledgeBase

    kb = KnowledgeBase(settings, "policies", create=True)
    kb.add_items(write_files(tmp_path / "d", DOCS), progress=False)
    home = settings.home
    monkeypatch.delenv("KB_HOME")
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
    assert kb_main(["migrate", "--kb", "policies", "--config", str(to_milvus), "--to", str(back), "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (r["from"], r["to"]) == ("milvus", "faiss") and r["same_top5"] >= 0.95
    assert (tmp_path / "home2" / "policies" / "store.sqlite").is_file()
    assert kb_main(["migrate", "--kb", "policies", "--config", str(back), "--to", str(back)]) == 2
    assert "same place" in capsys.readouterr().err
