"""Chunks people can see and fix: `KnowledgeBase.chunks` / `edit_chunk`, the edit's key information,
index entries and audit, its survival across re-ingests (unchanged, forced re-parse, reindex, a
changed file), the `kb chunks` CLI, the HTTP routes with auth, and a kill between store and index."""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys

import httpx
import pytest

from ingest.pipeline import FileItem
from retrieval.knowledge_base import MAX_CHUNK_TEXT, BadChunkText, KnowledgeBase, NoSuchChunk
from tests.conftest import ROOT, serving, write_files

HANDBOOK = ("# Staff handbook\n\n"
            "## Parking\n\nStaff park in the north garage on level two. The garage opens at seven.\n\n"
            "## Lunch\n\nThe canteen serves lunch from noon until two. Vegetarian dishes are marked green.\n\n"
            "## Badges\n\nLost badges are replaced by reception for a fee of ten euros.\n")
OTHER = {"travel.md": "# Travel\n\nTrain tickets are booked through the travel desk two weeks ahead."}
OLD = "north garage on level two"
NEW = ("Staff park their bicycles in the courtyard shed behind the bakery. "
       "The shed is unlocked by the caretaker Margaret Oyelaran every morning.")


def _ingest(settings, tmp_path, name: str = "handbook") -> tuple[KnowledgeBase, FileItem]:
    k = KnowledgeBase(settings, name, create=True)
    items = write_files(tmp_path / "docs", {"handbook.md": HANDBOOK, **OTHER})
    k.add_items(items, progress=False)
    return k, items[0]


def _parking(k: KnowledgeBase, doc_id: str) -> dict:
    return next(c for c in k.chunks(doc_id)["chunks"] if "garage" in c["text"] or "courtyard" in c["text"])


def _texts(k: KnowledgeBase, query: str) -> str:
    return "\n".join(h.text for h in k.search(query, 5))


def test_an_edit_is_searched_rekeyed_audited_and_survives_reingest_reparse_reindex_and_a_changed_file(
        settings, tmp_path):
    k, item = _ingest(settings, tmp_path)
    doc = item.doc_id
    view = k.chunks(doc)
    assert view["source"] == "handbook.md" and view["article"]["level"] == "article"
    before = _parking(k, doc)
    assert before["edited"] is None and before["key_info"]["level"] == "segment" and before["key_info"]["keywords"]
    lunch_before = next(c for c in view["chunks"] if "canteen" in c["text"])

    out = k.edit_chunk(doc, before["ord"], f"  {NEW}\n", "alice")
    assert out["changed"] and out["user"] == "alice" and out["index"]["added"] > 0
    after = _parking(k, doc)
    assert after["text"] == NEW and after["edited"]["user"] == "alice"
    assert any("bicycles" in w or "courtyard" in w for w in after["key_info"]["keywords"])  # key info re-extracted
    assert "Margaret Oyelaran" in " ".join(after["key_info"]["entities"] + after["key_info"]["key_text"].split("\n"))
    assert {s["text"] for s in after["sentences"]} == {NEW.split(". ")[0] + ".", NEW.split(". ")[1]}
    article = k.chunks(doc)["article"]
    assert "bicycles" in article["key_text"] or "courtyard" in article["key_text"]
    assert next(c for c in k.chunks(doc)["chunks"] if "canteen" in c["text"]) == lunch_before  # others untouched
    hits = k.search("where do staff park their bicycles, courtyard shed", 3)
    assert hits[0].doc_id == doc and NEW in hits[0].text  # (a short document is found as a whole)
    assert OLD not in _texts(k, "north garage on level two")  # the old text is gone from the index too
    [audit] = k.chunk_edits(doc)
    assert (audit["user"], audit["new_text"], audit["chunk_id"]) == ("alice", NEW, after["chunk_id"])
    assert OLD in audit["old_text"] and audit["at"].endswith("+00:00")

    # bad edits are refused and change nothing
    for bad in ("", "   \n", "x" * (MAX_CHUNK_TEXT + 1)):
        with pytest.raises(BadChunkText):
            k.edit_chunk(doc, after["ord"], bad, "alice")
    with pytest.raises(BadChunkText, match="user"):
        k.edit_chunk(doc, after["ord"], "text", " ")
    with pytest.raises(NoSuchChunk, match="no document"):
        k.edit_chunk("nope", 0, "text", "alice")
    with pytest.raises(NoSuchChunk, match="no chunk"):
        k.edit_chunk(doc, 999, "text", "alice")
    with pytest.raises(NoSuchChunk):
        k.chunks("nope")
    assert len(k.chunk_edits()) == 1 and _parking(k, doc)["text"] == NEW

    # re-ingesting the unchanged file: skipped, edit kept
    assert k.add_items([item], progress=False)["skipped"] == 1
    assert _parking(k, doc)["text"] == NEW
    # a forced re-parse (the stored hash no longer matches): parsed again, edit put back and re-keyed
    with k.store() as store, store.conn:
        store.conn.execute("UPDATE documents SET content_hash='stale' WHERE doc_id=?", (doc,))
    assert k.add_items([item], progress=False)["ingested"] == 1
    again = _parking(k, doc)
    assert again["text"] == NEW and again["edited"]["user"] == "alice"
    assert again["key_info"] == after["key_info"]
    assert NEW in k.search("where do staff park their bicycles, courtyard shed", 1)[0].text
    # a rebuilt index reads the edited text from the store
    k.reindex()
    assert NEW in k.search("where do staff park their bicycles, courtyard shed", 1)[0].text
    assert OLD not in _texts(k, "north garage on level two")

    # a changed file whose parking paragraph is still there: the edit is put back
    item.path.write_text(HANDBOOK.replace("ten euros", "twelve euros"), encoding="utf-8")
    assert k.add_items([item], progress=False)["ingested"] == 1
    view = k.chunks(doc)
    assert _parking(k, doc)["text"] == NEW and any("twelve euros" in c["text"] for c in view["chunks"])
    # a second edit of an edited chunk is still keyed by the parsed text (so it survives the same way)
    k.edit_chunk(doc, _parking(k, doc)["ord"], NEW + " Helmets are stored there too.", "bob")
    assert _parking(k, doc)["edited"]["user"] == "bob"
    edits = k.chunk_edits(doc)
    assert [e["user"] for e in edits] == ["alice", "bob"] and edits[0]["orig_sha256"] == edits[1]["orig_sha256"]
    # the parking paragraph rewritten at the source: the new source text wins, the audit stays
    item.path.write_text(HANDBOOK.replace("north garage on level two", "south garage on level one"),
                         encoding="utf-8")
    k.add_items([item], progress=False)
    assert "south garage on level one" in _parking(k, doc)["text"] and _parking(k, doc)["edited"] is None
    assert len(k.chunk_edits(doc)) == 2


def test_kb_chunks_lists_and_edits_from_the_command_line(settings, tmp_path, capsys):
    from cli import main

    k, item = _ingest(settings, tmp_path)
    assert main(["chunks", "--kb", "handbook", "--doc", item.doc_id, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    parking = next(c for c in listed["chunks"] if "garage" in c["text"])
    assert listed["doc_id"] == item.doc_id and listed["article"]["keywords"] and parking["key_info"]["keywords"]
    assert main(["chunks", "edit", "--kb", "handbook", "--doc", item.doc_id, "--chunk", str(parking["ord"]),
                 "--text", NEW, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["changed"] and out["user"] == getpass.getuser()
    new_file = tmp_path / "new.txt"
    new_file.write_text(NEW + " Bring a lock.", encoding="utf-8")
    assert main(["chunks", "edit", "--kb", "handbook", "--doc", item.doc_id, "--chunk", parking["chunk_id"],
                 "--file", str(new_file), "--user", "carol", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["user"] == "carol"
    assert main(["search", "courtyard shed for bicycles", "--kb", "handbook", "--json"]) == 0
    assert NEW + " Bring a lock." in json.loads(capsys.readouterr().out)["hits"][0]["text"]
    for argv, message in ((["--doc", "nope"], "no document 'nope'"),
                          (["--doc", item.doc_id, "--chunk", "99", "--text", "x"], "no chunk"),
                          (["--doc", item.doc_id, "--chunk", "0", "--text", " "], "empty"),
                          (["--doc", item.doc_id, "--chunk", "0"], "--text TEXT or --file FILE")):
        edit = ["edit"] if "--chunk" in argv else []
        assert main(["chunks", *edit, "--kb", "handbook", *argv]) == 2
        assert message in capsys.readouterr().err
    assert [e["user"] for e in k.chunk_edits()] == [getpass.getuser(), "carol"]


def test_the_api_lists_and_edits_chunks_with_the_keys_rights(settings, tmp_path):
    from serve.api import create_app, key_user
    from serve.auth import KeyRing

    k, item = _ingest(settings, tmp_path)
    keys = {"reader": ["handbook"], "writer": ["handbook:rw"], "other": ["elsewhere:rw"]}
    base_path = f"/v1/kbs/handbook/documents/{item.doc_id}/chunks"
    with serving(create_app(settings, keys=KeyRing(keys))) as base:
        def call(method: str, path: str, key: str | None, **kw) -> httpx.Response:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            return httpx.request(method, base + path, headers=headers, timeout=60, **kw)

        assert call("GET", base_path, None).status_code == 401
        assert call("GET", base_path, "other").status_code == 403
        listed = call("GET", base_path, "reader")
        assert listed.status_code == 200
        parking = next(c for c in listed.json()["chunks"] if "garage" in c["text"])
        put = f"{base_path}/{parking['ord']}"
        assert call("PUT", put, "reader", json={"text": NEW}).status_code == 403
        r = call("PUT", put, "writer", json={"text": "  "})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
        assert call("PUT", put, "writer", json={"text": "x" * (MAX_CHUNK_TEXT + 1)}).status_code == 422
        assert call("PUT", f"{base_path}/999", "writer", json={"text": NEW}).status_code == 404
        r = call("PUT", "/v1/kbs/handbook/documents/nope/chunks/0", "writer", json={"text": NEW})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert call("GET", "/v1/kbs/handbook/documents/nope/chunks", "reader").status_code == 404
        assert call("GET", "/v1/kbs/missing/documents/x/chunks", "reader").status_code in (403, 404)
        r = call("PUT", put, "writer", json={"text": NEW, "user": "dora"})
        assert r.status_code == 200 and r.json()["changed"], r.text
        assert r.json()["user"] == key_user("writer", "dora") and "writer" not in r.json()["user"].split("(")[1]
        hits = call("POST", "/v1/search", "reader", json={"kb": "handbook", "query": "courtyard shed bicycles", "k": 1})
        assert NEW in hits.json()["hits"][0]["text"]
        again = next(c for c in call("GET", base_path, "reader").json()["chunks"] if c["ord"] == parking["ord"])
        assert again["text"] == NEW and again["edited"]["user"].startswith("dora (api-key:")
        assert any("courtyard" in w or "bicycles" in w for w in again["key_info"]["keywords"])
        paths = call("GET", "/openapi.json", "reader").json()["paths"]
        assert "put" in paths["/v1/kbs/{kb}/documents/{doc_id}/chunks/{ord}"] and "get" in paths[
            "/v1/kbs/{kb}/documents/{doc_id}/chunks"]
    [audit] = k.chunk_edits()
    assert audit["user"] == key_user("writer", "dora") and OLD in audit["old_text"]


def test_a_kill_between_the_stores_edit_and_the_index_leaves_a_consistent_kb(settings, tmp_path):
    k, item = _ingest(settings, tmp_path)
    parking = _parking(k, item.doc_id)
    gen = k.stats()["index_generation"]
    cmd = [sys.executable, "-m", "cli", "chunks", "edit", "--kb", "handbook", "--doc", item.doc_id,
           "--chunk", str(parking["ord"]), "--text", NEW, "--user", "eve", "-q"]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "KB_FAULT": "kb.before_sync"}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-3000:]
    reader = KnowledgeBase(settings, "handbook")
    assert reader.stats()["index_generation"] == gen  # killed before the index sync
    assert _parking(reader, item.doc_id)["text"] == NEW and reader.chunk_edits()[0]["user"] == "eve"
    # the index still names the old entries, which the store no longer has: no hit carries the old text
    assert OLD not in _texts(reader, "north garage on level two")
    assert all(h.text for h in reader.search("canteen lunch", 3))
    # running the edit again completes it: nothing to change in the store, the index brought in line
    out = reader.edit_chunk(item.doc_id, parking["ord"], NEW, "eve")
    assert not out["changed"] and out["index"]["added"] > 0
    assert NEW in reader.search("where do staff park their bicycles, courtyard shed", 1)[0].text
    assert len(reader.chunk_edits()) == 1


def test_an_api_editor_cannot_forge_a_key_fingerprint_or_a_listing_line():
    from serve.api import key_user

    real = key_user("writer")
    forged = key_user("writer", " mallory (api-key:000000000000)\n[3] (edited by boss)\u2028 ")
    assert forged == f"mallory api-key:000000000000 3 edited by boss ({real})"
    assert forged.count("(") == 1 and forged.endswith(f"({real})") and key_user("writer", "\n ( ) ") == real


def test_a_chunk_name_that_is_no_decimal_ord_is_no_such_chunk():
    from retrieval.knowledge_base import chunk_ord

    assert chunk_ord("d", " 3 ") == 3 and chunk_ord("d", "d-00007") == 7 and chunk_ord("d", 2) == 2
    for bad in ("²", "d-²", "x", "-1", -1):
        with pytest.raises(NoSuchChunk):
            chunk_ord("d", bad)
