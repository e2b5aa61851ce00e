"""Parsing throughput on 1 and 2 worker processes: documents/s of `FileParser.parse_each` (the
sandboxed parse + clean that `kb ingest` runs, no chunking or embedding) against the core count.

    .venv/bin/python -m bench.parse                          # the full run (about 5 min)
    .venv/bin/python -m bench.parse --copies 1 --repeats 1   # a quick check that it works

The corpus is samples/docs (the unstructured project's example documents, Apache-2.0: PDF, DOCX,
PPTX, XLSX, HTML, Markdown, text, including a malformed, an empty and two password-protected
files, which fail quickly as they would in a real batch) copied `--copies` times under distinct
paths. Each worker count gets one FileParser whose first pass (starting the fork server and the
workers) is timed apart; then the counts take turns for `--repeats` timed passes, so that load from
elsewhere falls on both alike, and the median pass gives the docs/s. The load average and the
workers' CPU seconds per wall second are recorded for every pass: on a busy machine (more so with
the kernel's session autogroups, also recorded) the workers share what CPU the session gets and
the figure understates the speed-up; run it on an idle machine.

Writes bench/results/parse.json (or --name): docs/s per worker count, the speed-up over one
worker against the target (2 workers >= 1.7x), os.cpu_count(), the usable cores
(os.sched_getaffinity), the load averages, the corpus by format, and the resolved parse config.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples" / "docs"
TARGET_SPEEDUP = 1.7


def build_corpus(out: Path, copies: int) -> list[Path]:
    """samples/docs (less its licence file) copied `copies` times, each copy in its own folder."""
    files = sorted(p for p in SAMPLES.iterdir() if p.is_file() and not p.name.startswith("LICENSE"))
    made = []
    for k in range(copies):
        d = out / f"copy-{k:02d}"
        d.mkdir(parents=True)
        for f in files:
            made.append(Path(shutil.copy2(f, d / f.name)))
    return made


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes `pids` have used (0 for those gone)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def autogroup() -> bool | None:
    """Whether the kernel groups a session's processes for CPU fairness (then, with other sessions
    busy, this run's workers share one session's slice and more workers add little)."""
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return None


def one_pass(parser, items) -> tuple[float, int, float]:
    """Seconds to parse `items` once, how many parsed (the rest failed with a reason), and the
    workers' CPU seconds over the pass per wall second (near the worker count when they had the
    cores to themselves; a worker replaced mid-pass loses its share)."""
    pool = parser.pool
    pids = pool.pids() if pool is not None else []
    before = cpu_seconds(pids)
    t0 = time.perf_counter()
    ok = sum(not isinstance(outcome, Exception) for _, outcome in parser.parse_each(items))
    seconds = time.perf_counter() - t0
    if pool is not None:
        pids = [p for p in pool.pids() if p in pids]
    return seconds, ok, (cpu_seconds(pids) - before) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare")
    ap.add_argument("--copies", type=int, default=4, help="copies of samples/docs (21 files each)")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes per worker count (median)")
    ap.add_argument("--name", default="parse", help="result file bench/results/NAME.json")
    args = ap.parse_args()

    from bench.common import table, write_result
    from ingest.pipeline import FileParser, items_from_paths
    from kb.settings import load_settings

    work = Path(tempfile.mkdtemp(prefix="kb-bench-parse-"))
    try:
        files = build_corpus(work / "corpus", args.copies)
        items, _ = items_from_paths([work / "corpus"])
        assert len(items) == len(files), "every copy must be a distinct document"
        settings = {w: load_settings(None, **{"home": str(work / "home"), "parse.workers": w})
                    for w in args.workers}
        parsers = {w: FileParser(settings[w]) for w in args.workers}
        runs: dict[int, dict] = {w: {"workers": w, "passes_s": [], "worker_cpu_per_s": [], "loadavg_1m": []}
                                 for w in args.workers}
        try:
            for w, p in parsers.items():
                seconds, runs[w]["parsed"], _ = one_pass(p, items)
                runs[w]["first_pass_s"] = round(seconds, 2)
            for _ in range(args.repeats):
                for w, p in parsers.items():
                    runs[w]["loadavg_1m"].append(round(os.getloadavg()[0], 2))
                    seconds, _, busy = one_pass(p, items)
                    runs[w]["passes_s"].append(round(seconds, 3))
                    runs[w]["worker_cpu_per_s"].append(round(busy, 2))
            for w, p in parsers.items():
                runs[w]["worker_restarts"] = p.pool.restarts if p.pool is not None else 0
        finally:
            for p in parsers.values():
                p.close()
        rows = []
        for r in runs.values():
            med = statistics.median(r["passes_s"])
            r.update({"docs": len(items), "median_s": round(med, 3), "docs_per_s": round(len(items) / med, 2)})
            rows.append(r)
        base = runs[min(runs)]["docs_per_s"]
        for r in rows:
            r["speedup"] = round(r["docs_per_s"] / base, 2)
        print(table(rows, ["workers", "docs", "parsed", "first_pass_s", "median_s", "docs_per_s", "speedup",
                           "worker_cpu_per_s", "loadavg_1m"]))
        two = runs.get(2)
        cores = {"cpu_count": os.cpu_count(), "usable": len(os.sched_getaffinity(0)),
                 "sched_autogroup": autogroup()}
        out = write_result(args.name, {
            "config": {"parse": {w: settings[w].parse.model_dump() for w in args.workers},
                       "copies": args.copies, "repeats": args.repeats},
            "cores": cores,
            "loadavg_end": [round(v, 2) for v in os.getloadavg()],
            "corpus": {"docs": len(items), "by_format": dict(Counter(f.suffix for f in files)),
                       "source": "samples/docs (unstructured example-docs, Apache-2.0), less the licence file"},
            "runs": rows,
            "target": {"speedup_2_workers": TARGET_SPEEDUP,
                       "met": None if two is None else two["speedup"] >= TARGET_SPEEDUP},
            "note": "docs/s = documents attempted / median pass time (failing files included); "
                    "first_pass_s includes starting the fork server and the workers; a 1-minute "
                    "load average well above 0, or worker_cpu_per_s well below the worker count, "
                    "means other work shared the cores and the speed-up is understated",
        })
        print(f"wrote {out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
