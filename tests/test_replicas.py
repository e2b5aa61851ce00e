"""Stateless replicas on a shared store, for real: PostgreSQL (a throwaway server), `milvus-lite
server`, two `kb serve` processes with data folders of their own and `kb worker` processes. An
upload through one replica is answered through the other; killing a replica or a worker with
SIGKILL loses no acknowledged upload; the shared backends answer as the embedded ones do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from tests.conftest import DOCS, free_port, write_files
from tests.test_milvus import top5
from tests.test_pgstore import pg_settings

KEY = "replica-test-key"


def test_a_shared_kb_answers_as_the_embedded_one(settings, tmp_path, pg_db_url, milvus_server, cmrc_docs):
    """The same documents ingested into SQLite + FAISS and into PostgreSQL + Milvus: the same top 5
    for at least 95% of the CMRC questions, and the same stored documents and chunks."""
    from kb.settings import apply_overrides
    from retrieval.knowledge_base import KnowledgeBase, list_kbs

    docs, questions = cmrc_docs
    embedded = KnowledgeBase(settings, "cmrc", create=True)
    embedded.add_paths([docs], progress=False)
    shared_settings = apply_overrides(pg_settings(settings, pg_db_url), {"milvus.uri": milvus_server,
                                                                         "home": str(tmp_path / "other_home")})
    shared = KnowledgeBase(shared_settings, "cmrc", create=True)
    shared.add_paths([docs], progress=False)
    assert not (shared.dir / "store.sqlite").exists()
    assert list_kbs(shared_settings) == list_kbs(settings) == [{"name": "cmrc", "documents": 12,
                                                               "chunks": embedded.stats()["chunks"]}]
    with embedded.store() as a, shared.store() as b:
        assert [(c["chunk_id"], c["text"]) for c in a.chunks()] == [(c["chunk_id"], c["text"]) for c in b.chunks()]
    same = np.mean([g == w for g, w in zip(top5(shared, questions), top5(embedded, questions))])
    print(f"same top 5: {same:.3f} of {len(questions)} questions")
    assert same >= 0.95
    shared.delete()
    assert list_kbs(shared_settings) == [] and not KnowledgeBase(shared_settings, "cmrc", create=True).exists()


def write_config(path: Path, settings, pg_url: str, milvus_uri: str, **serve) -> Path:
    """A config file for the replicas and workers: shared store and index, the test's models."""
    cfg = {"store": {"url": pg_url}, "retrieval": {"backend": "milvus"}, "milvus": {"uri": milvus_uri},
           "models": {"embedder": settings.models.embedder, "nsp": str(settings.models.nsp),
                      "nsp_encoder": settings.models.nsp_encoder, "llm": None, "device": "cpu",
                      "dir": str(settings.models_dir())},
           "llm": {"adapter": None}, "compliance": {"min_retrieval_confidence": 0.4},
           "serve": {"api_keys": {KEY: ["*:rw"]}, "job_lease_s": 3.0, "worker_poll_s": 0.2, **serve}}
    path.write_text(yaml.safe_dump(cfg))
    return path


class Fleet:
    """The processes of the test, each with its own data folder and log."""

    def __init__(self, root: Path, config: Path) -> None:
        self.root, self.config, self.procs = root, config, []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("KB_")}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        home = self.root / name
        home.mkdir(parents=True, exist_ok=True)
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen([sys.executable, "-m", "cli", *args, "--config", str(self.config)],
                                env={**self.env, "KB_HOME": str(home / "kb_data")}, cwd=home,
                                stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def serve(self, name: str) -> str:
        port = free_port()
        self.start(name, "serve", "--host", "127.0.0.1", "--port", str(port))
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(30)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-3000:]


def wait_up(base: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{base} did not come up")


def api(base: str) -> httpx.Client:
    return httpx.Client(base_url=base, timeout=120, headers={"Authorization": f"Bearer {KEY}"})


def wait_job(base: str, job_id: str, timeout: float = 180) -> dict:
    deadline = time.time() + timeout
    with api(base) as c:
        while time.time() < deadline:
            job = c.get(f"/v1/jobs/{job_id}").json()["job"]
            if job["state"] in ("done", "failed"):
                return job
            time.sleep(0.3)
    raise AssertionError(f"job {job_id} not finished in {timeout} s")


@pytest.fixture()
def fleet(tmp_path, settings, pg_db_url, milvus_server):
    f = Fleet(tmp_path / "fleet", write_config(tmp_path / "shared.yaml", settings, pg_db_url, milvus_server,
                                               upload_wait_s=0.0))
    f.root.mkdir()
    yield f
    f.stop()


def test_an_upload_through_one_replica_is_answered_through_another(fleet):
    a, b = fleet.serve("replica-a"), fleet.serve("replica-b")
    fleet.start("worker-1", "worker")
    wait_up(a)
    wait_up(b)
    with api(a) as ca:
        r = ca.post("/v1/kbs/policies/documents", files={"files": ("shipping.md", DOCS["shipping.md"].encode())})
    assert r.status_code == 202, r.text  # upload_wait_s 0: acknowledged once queued
    job = r.json()["job"]
    assert r.headers["location"] == f"/v1/jobs/{job['job_id']}" and job["state"] in ("queued", "running")
    done = wait_job(b, job["job_id"])
    assert done["state"] == "done", (done, fleet.log("worker-1"))
    assert done["result"]["ingested"] == 1 and len(done["result"]["doc_ids"]) == 1 and done["attempts"] == 1
    with api(b) as cb:
        out = cb.post("/v1/ask", json={"kb": "policies", "question": "How long does express delivery take?"}).json()
        assert not out["fallback"], out
        assert "one day" in out["answer"] and out["sources"][0]["source"] == "shipping.md"
        docs = cb.get("/v1/kbs/policies/documents").json()["documents"]
        assert [d["source"] for d in docs] == ["shipping.md"]
        assert cb.get("/v1/kbs").json()["kbs"] == [{"name": "policies", "documents": 1, "chunks": docs[0]["n_chunks"]}]
    homes = [fleet.root / n / "kb_data" for n in ("replica-a", "replica-b", "worker-1")]
    assert not any((h / "policies" / "store.sqlite").exists() for h in homes)


def test_killed_replicas_and_workers_lose_no_acknowledged_upload(fleet):
    """Uploads go to replica A while A is killed (SIGKILL) and, later, the worker in the middle of
    its work: every upload A acknowledged is ingested, by a second worker, and answered through B."""
    a, b = fleet.serve("replica-a"), fleet.serve("replica-b")
    worker = fleet.start("worker-1", "worker")
    wait_up(a)
    wait_up(b)
    acked: dict[str, str] = {}  # job_id -> the distinct word of its document
    errors: list[str] = []

    def load() -> None:
        with api(a) as c:
            for i in range(200):
                word = f"zephyr{i:03d}"
                body = f"# Note {i}\n\nThe code word of note {i} is {word}. It opens locker {i}.".encode()
                try:
                    r = c.post("/v1/kbs/notes/documents", files={"files": (f"note{i}.md", body)})
                except httpx.HTTPError as e:  # the replica died under this request: never acknowledged
                    errors.append(type(e).__name__)
                    return
                assert r.status_code == 202, r.text
                acked[r.json()["job"]["job_id"]] = word

    t = threading.Thread(target=load)
    t.start()
    deadline = time.time() + 120
    while len(acked) < 8 and time.time() < deadline:
        time.sleep(0.05)
    fleet.procs[0].send_signal(signal.SIGKILL)  # replica A, in the middle of the load
    t.join(60)
    assert errors and 8 <= len(acked) < 200, (len(acked), errors)
    # the worker dies in the middle of a job; a second worker takes the queue, and the dead one's job
    # again once its lease (3 s) has run out
    with api(b) as cb:
        deadline = time.time() + 120
        while time.time() < deadline and not any(cb.get(f"/v1/jobs/{j}").json()["job"]["state"] == "running"
                                                 for j in acked):
            time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    fleet.start("worker-2", "worker")
    states = {j: wait_job(b, j, 300) for j in acked}
    assert all(s["state"] == "done" for s in states.values()), (states, fleet.log("worker-2"))
    assert any(s["attempts"] == 2 for s in states.values()), "the killed worker's job was not taken again"
    assert all(s["result"]["ingested"] + s["result"]["skipped"] == 1 for s in states.values())
    with api(b) as cb:
        sources = {d["source"] for d in cb.get("/v1/kbs/notes/documents").json()["documents"]}
        assert {f"note{int(w.removeprefix('zephyr'))}.md" for w in acked.values()} <= sources
        for word in list(acked.values())[:5]:
            hits = cb.post("/v1/ask", json={"kb": "notes", "question": f"Which locker does {word} open?"}).json()
            assert word in " ".join(s["text"] for s in hits["sources"][:3]), (word, hits)


def test_kb_migrate_moves_a_kb_into_the_shared_store_and_back(settings, tmp_path, capsys, pg_db_url,
                                                             milvus_server):
    """`kb migrate`: SQLite + FAISS -> PostgreSQL + Milvus server -> SQLite + FAISS in another data
    folder, each verified; a failed migration into PostgreSQL leaves no KB there; edits and FAQ
    entries travel with the store, and ids continue after the copied ones."""
    from cli.main import main as kb_main
    from kb.settings import load_settings_as_written
    from retrieval.knowledge_base import KnowledgeBase

    kb = KnowledgeBase(settings, "policies", create=True)
    kb.add_items(write_files(tmp_path / "d", DOCS), progress=False)
    doc = kb.documents()[0]["doc_id"]
    kb.edit_chunk(doc, 0, "Edited: refunds within 45 days.", "ann")
    with kb.store() as st:
        st.put_faq([{"faq_id": "f1", "question": "Do you ship abroad?", "answer": "Yes."}])
    base = tmp_path / "local.yaml"
    base.write_text(f"home: {settings.home}\nmodels: {{nsp: {settings.models.nsp}, device: cpu, llm: null}}\n")
    shared = tmp_path / "shared.yaml"
    shared.write_text(f"extends: {base}\nhome: {tmp_path / 'shared_home'}\nstore: {{url: '{pg_db_url}'}}\n"
                      f"retrieval: {{backend: milvus}}\nmilvus: {{uri: '{milvus_server}'}}\n")
    assert kb_main(["migrate", "--kb", "policies", "--config", str(base), "--to", str(shared),
                    "--min-agreement", "1.01"]) == 2
    capsys.readouterr()
    s2 = load_settings_as_written(shared)
    assert not KnowledgeBase(s2, "policies", create=True).exists()
    assert kb_main(["migrate", "--kb", "policies", "--config", str(base), "--to", str(shared), "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (r["from"], r["to"]) == ("faiss", "milvus") and r["same_top5"] >= 0.95 and r["source"] == r["target"]
    moved = KnowledgeBase(s2, "policies")
    assert [e["user"] for e in moved.chunk_edits()] == ["ann"]
    with moved.store() as st:
        assert [f["faq_id"] for f in st.faq_entries()] == ["f1"] and st.faq_revision() == 1
    again = moved.edit_chunk(doc, 1, "Edited twice.", "bob")  # identity columns go on after the copied ids
    assert again["edit_id"] > 1

    back = tmp_path / "back.yaml"
    back.write_text(f"extends: {base}\nhome: {tmp_path / 'home3'}\n")
    assert kb_main(["migrate", "--kb", "policies", "--config", str(shared), "--to", str(back), "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (r["from"], r["to"]) == ("milvus", "faiss") and r["same_top5"] >= 0.95
    home3 = KnowledgeBase(load_settings_as_written(back), "policies")
    assert [e["user"] for e in home3.chunk_edits()] == ["ann", "bob"]


def test_an_upload_waits_for_its_job_and_answers_the_ingest_json(settings, tmp_path, pg_db_url):
    """In one process (a Milvus Lite file): with a worker running, an upload through the API
    answers 200 with the `kb ingest` JSON and its job id within serve.upload_wait_s; with none,
    it answers 202 with the job once serve.upload_wait_s has passed, and the job waits."""
    from kb.settings import apply_overrides
    from serve.api import create_app
    from serve.auth import KeyRing
    from serve.worker import run_worker
    from tests.conftest import serving

    s = apply_overrides(pg_settings(settings, pg_db_url), {"serve.upload_wait_s": 60.0, "serve.worker_poll_s": 0.1})
    stop = threading.Event()
    worker = threading.Thread(target=run_worker, args=(s,), kwargs={"stop": stop})
    worker.start()
    try:
        with serving(create_app(s, keys=KeyRing({KEY: ["*:rw"]}))) as base, api(base) as c:
            r = c.post("/v1/kbs/policies/documents", files={"files": ("refunds.md", DOCS["refunds.md"].encode())})
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["ingested"] == 1 and len(out["job_id"]) == 24 and out["failed"] == []
            r = c.post("/v1/kbs/policies/documents", files={"files": ("empty.md", b"")})
            assert r.status_code == 422 and r.json()["error"]["code"] == "unreadable_document"
    finally:
        stop.set()
        worker.join(60)
    s2 = apply_overrides(s, {"serve.upload_wait_s": 0.5})
    with serving(create_app(s2, keys=KeyRing({KEY: ["*:rw"]}))) as base, api(base) as c:
        r = c.post("/v1/kbs/policies/documents", files={"files": ("shipping.md", DOCS["shipping.md"].encode())})
        assert r.status_code == 202 and r.json()["job"]["state"] == "queued"
        job = c.get(r.headers["location"]).json()["job"]
        assert job["state"] == "queued" and job["result"] is None
        assert c.get("/v1/jobs/" + "0" * 24).status_code == 404
    from serve import jobs

    waiting = jobs.waiting(s.store)
    s3 = apply_overrides(s2, {"serve.max_upload_mb": 0.001})  # 1 KiB: an oversize file queues nothing
    with serving(create_app(s3, keys=KeyRing({KEY: ["*:rw"]}))) as base, api(base) as c:
        files = [("files", ("ok.md", b"small")), ("files", ("big.md", b"x" * 4096))]
        r = c.post("/v1/kbs/policies/documents", files=files)
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large", r.text
    assert jobs.waiting(s.store) == waiting
