"""Load on one and on two stateless API replicas over the shared backends (PostgreSQL store,
Milvus level 1), beside one server on the embedded backends (SQLite + FAISS), on this machine.

The sample documents are ingested once (embedded) and moved into the shared backends with
`kb migrate` (a copy of the same store, checked to answer alike); then, for each row, N `kb serve`
processes (each with a data folder of its own) take the same closed-loop load as bench/load.py
(/v1/ask with answerable and unanswerable questions, one request in five a streamed chat
completion; extractive answers, so no LLM dominates), the clients spread evenly over the replicas
(what a round-robin load balancer does). `milvus-lite server` is started here unless `--milvus-uri`
names a Milvus; PostgreSQL is given by `--store-url`.

    python -m bench.replicas --store-url postgresql://kb@127.0.0.1:5432/kbbench --name replicas_cpu
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import free_port, table, wait_until_healthy, write_result
from bench.load import KEY, QUESTIONS, run_load, stats

ROOT = Path(__file__).resolve().parent.parent


def start_milvus(root: Path, timeout_s: float = 120) -> tuple[subprocess.Popen, str]:
    """`milvus-lite server` on a free loopback port, its data in `root`/milvus; the process and its
    URI once it answers (RuntimeError, the process killed, when it does not within `timeout_s`)."""
    from pymilvus import MilvusClient

    exe = shutil.which("milvus-lite") or str(Path(sys.executable).parent / "milvus-lite")
    port = free_port()
    proc = subprocess.Popen([exe, "server", "--data-dir", str(root / "milvus"), "--host", "127.0.0.1", "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while True:
        try:
            MilvusClient(uri=uri, timeout=2).list_collections()
            return proc, uri
        except Exception:  # noqa: BLE001 (not up yet)
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("milvus-lite server did not start") from None
            time.sleep(0.3)


def write_configs(root: Path, store_url: str, milvus_uri: str, kb: str) -> dict[str, Path]:
    """The embedded and the shared configuration files (the defaults otherwise)."""
    keys = {"serve": {"api_keys": {KEY: [kb]}}, "llm": {"backend": "extractive"}}
    out = {"embedded": root / "embedded.yaml", "shared": root / "shared.yaml"}
    out["embedded"].write_text(yaml.safe_dump({"extends": str(ROOT / "configs" / "default.yaml"), **keys}))
    out["shared"].write_text(yaml.safe_dump({"extends": str(ROOT / "configs" / "default.yaml"), **keys,
                                             "store": {"url": store_url}, "retrieval": {"backend": "milvus"},
                                             "milvus": {"uri": milvus_uri}}))
    return out


def kb_cmd(config: Path, home: Path, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "KB_HOME": str(home)}
    return subprocess.Popen([sys.executable, "-m", "cli", *args, "--config", str(config)], env=env, cwd=ROOT, **popen)


def run_row(config: Path, root: Path, name: str, replicas: int, kb: str, clients: int, seconds: float,
            shared_home: bool) -> dict:
    """Start `replicas` servers, warm each, put the load on them together; the row's figures."""
    procs, bases = [], []
    try:
        for i in range(replicas):
            home = root / "embedded_home" if shared_home else root / f"{name}_{i}"
            log = root / f"{name}_{i}.log"
            port = free_port()
            with open(log, "wb") as f:
                procs.append(kb_cmd(config, home, "serve", "--port", str(port), stdout=f, stderr=subprocess.STDOUT))
            bases.append((f"http://127.0.0.1:{port}", procs[-1], log))
        import httpx

        for base, proc, log in bases:
            wait_until_healthy(base, proc, 300, log)
            httpx.post(f"{base}/v1/ask", json={"kb": kb, "question": QUESTIONS[0]},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=300).raise_for_status()

        async def together():
            per = [clients // replicas + (1 if i < clients % replicas else 0) for i in range(replicas)]
            return await asyncio.gather(*(run_load(b, kb, n, seconds) for (b, _, _), n in zip(bases, per)))

        parts = asyncio.run(together())
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
    lat = [x for latencies, _, _ in parts for xs in latencies.values() for x in xs]
    errors = [e for _, errs, _ in parts for e in errs]
    wall = max(w for _, _, w in parts)
    return {"backend": name.split("_")[0], "replicas": replicas, "clients": clients, "seconds": round(wall, 2),
            "requests": len(lat), "errors": len(errors), "error_samples": sorted(set(errors))[:5],
            "rps": round(len(lat) / wall, 2), **stats(lat)}


def probe(config: Path, home: Path, kb: str, n: int = 12) -> dict:
    """Milliseconds per call of the search's steps, one at a time, in this process: the dense and
    the BM25 search of level 1, and the store's part (the KB check, opening the store, reading the
    top hits)."""
    from kb.settings import apply_overrides, load_settings
    from retrieval.knowledge_base import KnowledgeBase

    k = KnowledgeBase(apply_overrides(load_settings(config), {"home": str(home)}), kb)
    q = QUESTIONS[1]
    k.search(q)
    live, qv = k._index(), k.embedder.encode_queries([q])
    ids = [int(i) for i in live.vectors.search(qv, 10)[1][0] if i >= 0]

    def store_part() -> None:
        k.is_current()
        with k.store() as st:
            st.key_infos(ki_ids=ids)

    steps = {"dense_search": lambda: live.vectors.search(qv, 50), "bm25_search": lambda: live.keywords.search(q, 50),
             "store": store_part, "whole_search": lambda: k.search(q, 5)}
    out = {}
    for name, f in steps.items():
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        out[f"{name}_ms"] = round((time.perf_counter() - t0) / n * 1000, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store-url", required=True, help="PostgreSQL for the shared rows (an empty database)")
    ap.add_argument("--milvus-uri", default="", help="a Milvus server; default: start `milvus-lite server`")
    ap.add_argument("--replicas", default="1,2")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--kb", default="samples")
    ap.add_argument("--name", default="replicas_cpu")
    args = ap.parse_args()

    from kb.db import redact
    from kb.settings import load_settings

    root = Path(tempfile.mkdtemp(prefix="kb-replicas-"))
    milvus, uri = (None, args.milvus_uri) if args.milvus_uri else start_milvus(root)
    try:
        configs = write_configs(root, args.store_url, uri, args.kb)
        resolved = load_settings(configs["shared"]).model_dump(mode="json")
        resolved["serve"]["api_keys"] = {"<key>": [args.kb]}
        resolved["store"]["url"] = redact(args.store_url)
        docs = str(ROOT / "samples" / "docs")
        home = root / "embedded_home"
        if kb_cmd(configs["embedded"], home, "ingest", docs, "--kb", args.kb, "-q").wait() not in (0, 2):
            raise RuntimeError("the ingest failed")
        if kb_cmd(configs["embedded"], home, "migrate", "--kb", args.kb, "--to", str(configs["shared"])).wait():
            raise RuntimeError("kb migrate into the shared backends failed")
        probes = {which: probe(configs[which], home, args.kb) for which in ("embedded", "shared")}
        load_before = os.getloadavg()
        rows = [run_row(configs["embedded"], root, "embedded", 1, args.kb, args.clients, args.seconds, True)]
        for n in (int(x) for x in args.replicas.split(",")):
            rows.append(run_row(configs["shared"], root, f"shared_{n}", n, args.kb, args.clients, args.seconds,
                                False))
    finally:
        if milvus is not None:
            milvus.kill()
            milvus.wait(30)
        shutil.rmtree(root, ignore_errors=True)
    result = {"runs": rows, "probe_one_at_a_time": probes, "cpu_cores": os.cpu_count(),
              "loadavg_before_after": [load_before, os.getloadavg()],
              "setup": {"store_url": redact(args.store_url), "milvus": "milvus-lite server" if milvus else uri,
                        "answers": "extractive (no LLM)", "balancing": "clients split evenly over the replicas",
                        "config": resolved}}
    path = write_result(args.name, result)
    print(table(rows, ["backend", "replicas", "clients", "requests", "errors", "rps", "p50_ms", "p95_ms", "p99_ms"]))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
