"""Load test of the HTTP API on localhost: N concurrent clients for T seconds.

Starts `kb serve` on the bundled sample KB (ingested first when missing) in its own process, then
runs N asyncio clients that each send a request, wait for the answer, and send the next, for T
seconds: /v1/ask (answerable and unanswerable questions) and, one request in five, a streamed
/v1/chat/completions read to its end. Reports throughput, errors and latency percentiles.

    python -m bench.load --clients 50 --seconds 30 --name load_cpu
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import free_port, table, wait_until_healthy, write_result

ROOT = Path(__file__).resolve().parent.parent

QUESTIONS = [
    "How many bottles of water were delivered?",
    "How many trucks were used?",
    "What is the body of water between England and Ireland?",
    "Who won the football world cup in 1998?",  # not in the documents: fallback
    "What does the handbook say about vacation?",
    "Which team won the Stanley Cup?",
]
KEY = "bench-key"


def ensure_kb(home: Path, kb: str) -> None:
    if (home / kb / "store.sqlite").is_file():
        return
    env = {**os.environ, "KB_HOME": str(home)}
    subprocess.run([sys.executable, "-m", "cli", "ingest", str(ROOT / "samples" / "docs"), "--kb", kb, "-q"],
                   check=True, env=env, cwd=ROOT)


async def client(http, kb: str, i: int, stop: float, lat: dict, errors: list) -> None:
    n = i
    while time.perf_counter() < stop:
        q = QUESTIONS[n % len(QUESTIONS)]
        kind = "chat_stream" if n % 5 == 4 else "ask"
        n += 1
        t0 = time.perf_counter()
        try:
            if kind == "ask":
                r = await http.post("/v1/ask", json={"kb": kb, "question": q})
                ok = r.status_code == 200 and "answer" in r.json()
            else:
                body = {"model": kb, "stream": True, "messages": [{"role": "user", "content": q}]}
                async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    text = "".join([line async for line in r.aiter_lines()])
                ok = r.status_code == 200 and "[DONE]" in text
            if not ok:
                errors.append(f"{kind}: HTTP {r.status_code}")
                continue
        except Exception as e:  # noqa: BLE001
            errors.append(f"{kind}: {type(e).__name__}: {e}")
            continue
        lat.setdefault(kind, []).append(time.perf_counter() - t0)


async def run_load(base: str, kb: str, clients: int, seconds: float) -> tuple[dict, list, float]:
    import httpx

    lat: dict[str, list[float]] = {}
    errors: list[str] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits,
                                 headers={"Authorization": f"Bearer {KEY}"}) as http:
        t0 = time.perf_counter()
        stop = t0 + seconds
        await asyncio.gather(*(client(http, kb, i, stop, lat, errors) for i in range(clients)))
        wall = time.perf_counter() - t0
    return lat, errors, wall


def stats(xs: list[float]) -> dict:
    a = np.asarray(xs) * 1000
    return {"n": len(a), "p50_ms": round(float(np.percentile(a, 50)), 1),
            "p95_ms": round(float(np.percentile(a, 95)), 1), "p99_ms": round(float(np.percentile(a, 99)), 1),
            "max_ms": round(float(a.max()), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--home", default="/tmp/kb_bench_home")
    ap.add_argument("--kb", default="samples")
    ap.add_argument("--name", default="load_cpu")
    args = ap.parse_args()

    home = Path(args.home)
    ensure_kb(home, args.kb)
    port = free_port()
    env = {**os.environ, "KB_HOME": str(home), "KB_API_KEYS": json.dumps({KEY: [args.kb]})}
    with open(home / "serve.log", "wb") as log:
        srv = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", str(port)], env=env, cwd=ROOT,
                               stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        import httpx

        wait_until_healthy(base, srv, 120, home / "serve.log")
        # warm up: load the KB, index and models once
        httpx.post(f"{base}/v1/ask", json={"kb": args.kb, "question": QUESTIONS[0]},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=120).raise_for_status()
        lat, errors, wall = asyncio.run(run_load(base, args.kb, args.clients, args.seconds))
    finally:
        srv.terminate()
        srv.wait(20)

    everything = [x for xs in lat.values() for x in xs]
    result = {"clients": args.clients, "seconds": round(wall, 2), "requests": len(everything),
              "errors": len(errors), "error_samples": sorted(set(errors))[:10],
              "rps": round(len(everything) / wall, 2), "all": stats(everything),
              **{k: stats(v) for k, v in sorted(lat.items())}, "cpu_cores": os.cpu_count(),
              "server": "kb serve (uvicorn, 1 process, extractive answers)"}
    path = write_result(args.name, result)
    rows = [{"requests": k, **result[k]} for k in ("all", *sorted(lat))]
    print(table(rows, ["requests", "n", "p50_ms", "p95_ms", "p99_ms", "max_ms"]))
    print(f"{result['requests']} requests in {result['seconds']} s ({result['rps']} req/s), "
          f"{result['errors']} errors -> {path}")


if __name__ == "__main__":
    main()
