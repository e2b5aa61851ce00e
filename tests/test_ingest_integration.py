"""Ingest the real sample documents (../shared/data/docs, bundled in samples/docs)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from ingest.pipeline import ingest, items_from_paths
from ingest.store import DocStore

UNREADABLE = {"empty.txt": "empty", "password.pdf": "password", "password_protected.xlsx": "password"}


def test_ingest_samples_reports_bad_files_and_keeps_going(settings, docs_copy):
    items, missing = items_from_paths([docs_copy, docs_copy / "nope.pdf"])
    report = ingest(items, "samples", settings, progress=False, failed=missing)
    failed = {Path(f["path"]).name: f["error"] for f in report.failed}
    assert set(failed) == set(UNREADABLE) | {"nope.pdf"}
    for name, word in UNREADABLE.items():
        assert word in failed[name].lower()
    assert report.ingested == len(items) - 3 and report.chunks > 50
    with DocStore.for_kb(settings.kb_dir("samples")) as store:
        counts = store.counts()
        assert counts["documents"] == report.ingested and counts["chunks"] == report.chunks
        kis = store.key_infos()
        assert {k["level"] for k in kis} == {"article", "segment", "sentence"}
        memo = [c for c in store.chunks() if c["source"] == "docs/fake-memo.pdf"]
        assert memo and memo[0]["page"] == 1
        table = [c for c in store.chunks() if c["source"] == "docs/stanley-cups.xlsx"]
        assert any("Team | Location | Stanley Cups" in c["text"] for c in table)

    again = ingest(items, "samples", settings, progress=False)  # unchanged: nothing to do
    assert (again.ingested, again.skipped) == (0, report.ingested)

    (docs_copy / "norwich-city.txt").write_text("Norwich City moved to a new stadium.\n", encoding="utf-8")
    third = ingest(items, "samples", settings, progress=False)
    assert third.ingested == 1 and third.skipped == report.ingested - 1
    with DocStore.for_kb(settings.kb_dir("samples")) as store:
        norwich = [c for c in store.chunks() if c["source"] == "docs/norwich-city.txt"]
        assert [c["text"] for c in norwich] == ["Norwich City moved to a new stadium."]


def test_ingest_trains_nsp_head_when_none_is_configured(tmp_path, docs_copy):
    from kb.settings import load_settings

    s = load_settings(None, **{"home": str(tmp_path / "h"), "models.device": "cpu",
                               "nsp_train.max_pairs": 64, "nsp_train.batch_size": 16})
    items, _ = items_from_paths([docs_copy / "norwich-city.txt", docs_copy / "handbook-1p.docx"])
    report = ingest(items, "kb1", s, progress=False)
    assert report.nsp and report.nsp["pairs"] == 64 and "heldout_accuracy" in report.nsp
    assert report.chunker.startswith("nsp") and (s.kb_dir("kb1") / "nsp" / "head.safetensors").is_file()
    assert report.nsp["kind"] == "pair_head"


def _kb(*args, env):
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_cli_ingest_json_kbs_and_rm(tmp_path, tiny_nsp_dir, docs_copy):
    env = {**os.environ, "KB_HOME": str(tmp_path / "home"), "KB_MODELS__NSP": str(tiny_nsp_dir)}
    r = _kb("ingest", str(docs_copy), "--kb", "samples", "--json", "-q", env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"kb", "files", "ingested", "skipped", "failed", "chunks", "key_infos", "seconds"} <= set(out)
    assert out["files"] == 22 and len(out["failed"]) == 3 and out["ingested"] == 19
    kbs = json.loads(_kb("kbs", "--json", env=env).stdout)["kbs"]
    assert kbs == [{"name": "samples", "documents": 19, "chunks": out["chunks"]}]
    doc = out["doc_ids"][0]
    r = _kb("rm", "--kb", "samples", "--doc", doc, "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["removed"]["doc_id"] == doc
    assert _kb("rm", "--kb", "samples", "--doc", doc, env=env).returncode == 2
    bad = _kb("ingest", str(docs_copy / "empty.txt"), "--kb", "samples", "--json", env=env)
    assert bad.returncode == 2 and json.loads(bad.stdout)["failed"][0]["error"] == "empty file"
    assert _kb("ingest", str(docs_copy), "--kb", "../evil", env=env).returncode == 2
    assert "invalid knowledge-base name" in _kb("ingest", str(docs_copy), "--kb", "../evil", env=env).stderr


def test_cli_search_and_eval_retrieval(tmp_path, tiny_nsp_dir, docs_copy):
    env = {**os.environ, "KB_HOME": str(tmp_path / "home"), "KB_MODELS__NSP": str(tiny_nsp_dir)}
    assert _kb("ingest", str(docs_copy / "stanley-cups.xlsx"), str(docs_copy / "fake-memo.pdf"),
               "--kb", "s", "-q", env=env).returncode == 0
    r = _kb("search", "bottles of water", "--kb", "s", "-k", "2", "--json", env=env)
    hits = json.loads(r.stdout)["hits"]
    assert hits[0]["source"] == "fake-memo.pdf" and "bottles" in hits[0]["text"]
    qfile = tmp_path / "q.jsonl"
    qfile.write_text('{"question": "How many bottles of water were there?", "answers": ["20,000"]}\n'
                     'not json\n{"question": "no answers here"}\n'
                     '{"question": "Which team is from STL?", "answers": ["Blues"]}\n')
    report = tmp_path / "r.html"
    r = _kb("eval", "retrieval", str(qfile), "--kb", "s", "-k", "3", "--json", "--report", str(report), env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["n"] == 2 and out["recall@3"] == 1.0 and {"mrr", "ndcg@3", "recall@1"} <= set(out)
    assert "q.jsonl:2" in r.stderr and "q.jsonl:3" in r.stderr
    assert report.is_file() and "data:image/png;base64" in report.read_text()
    assert _kb("search", "x", "--kb", "nope", env=env).returncode == 2
