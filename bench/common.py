"""Helpers shared by the benchmarks: device description, peak memory, result files."""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} (+{os.cpu_count()} CPU cores)"
    except Exception:  # noqa: BLE001
        pass
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_gpu_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def command() -> str:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)  # run as `python -m bench.NAME`
    argv = ["-m", spec.name, *sys.argv[1:]] if spec is not None and spec.name else sys.argv
    argv = [re.sub(r"(://[^:/@\s]+):[^@\s]*@", r"\1:***@", a) for a in argv]  # no password in a URL
    return " ".join(["python"] + [a if " " not in a else repr(a) for a in argv])


def write_result(name: str, payload: dict, data: tuple = ()) -> Path:
    """bench/results/NAME.json: device, command, commit, date (and the sha256 of each data file or
    folder in `data`) before `payload`."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    from eval.report import provenance

    prov = provenance(data=data)
    payload = {"device": device_name(), "command": command(), "commit": prov["commit"],
               "date": time.strftime("%Y-%m-%d"), **({"data_sha256": prov["data_sha256"]} if data else {}), **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    return path


def table(rows: list[dict], cols: list[str]) -> str:
    widths = [max([len(c), *(len(f"{r.get(c, '')}") for r in rows)]) for c in cols]
    line = lambda vals: "  ".join(f"{v!s:>{w}}" for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(cols)] + [line([r.get(c, "") for c in cols]) for r in rows])


def free_port() -> int:
    """A free TCP port on localhost."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(base: str, proc, timeout_s: float, log: Path) -> None:
    """Poll `base`/healthz until it answers 200; SystemExit (pointing at `log`) when `proc` exits
    or `timeout_s` passes first (the process is killed then)."""
    import httpx

    deadline = time.time() + timeout_s
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise SystemExit(f"server did not start; see {log}")
        time.sleep(0.5)
